#!/usr/bin/env bash
# Benchmark: `vedette-agent scan` against Debian's `yara -r -p 2`, side by side in one run, on the
# same files with the same rules (signature-base YARA), both with a 64 MiB file-size cap.
# Vedette also loads signature-base's hash, file-name and C2 lists (so it computes MD5, SHA-1 and
# SHA-256 of every file and matches every path); yara only runs the YARA rules.
# Also side by side: `bare-yarax` (tests/bench/bare_yarax.rs), yara-x alone with the same rules,
# files, threads and cap, and nothing else (no digests, no lists). Vedette runs twice per round:
# with no compiled rules kept (`--no-compiled-cache`: it compiles, as yara and bare-yarax do), and
# with the compiled rules an earlier run kept in its user cache directory (its default).
# Vedette scans in yara-x's fast-scan mode (a pattern that a condition only tests for presence
# is searched for until its first match), so yara and bare-yarax also run in their fast modes
# (`yara -f`, `bare-yarax --fast-scan`), beside their defaults.
# Then a second Vedette scan of the unchanged tree with the result cache.
#
#   tests/bench/scan_vs_yara.sh            (after `cargo build --release --bins`; needs `yara`)
#
# Environment: SIGNATURE_BASE (default ../shared/data/signature-base), CORPUS (directories,
# default /usr/lib/x86_64-linux-gnu /usr/bin /usr/share), AGENT (default target/release/vedette-agent),
# BARE (default: bare-yarax beside AGENT), RUNS (default 3).
set -euo pipefail
cd "$(dirname "$0")/../.."

sb=${SIGNATURE_BASE:-../shared/data/signature-base}
corpus=${CORPUS:-/usr/lib/x86_64-linux-gnu /usr/bin /usr/share}
agent=${AGENT:-target/release/vedette-agent}
runs=${RUNS:-3}
[ -d "$sb/yara" ] || { echo "no signature-base at $sb (set SIGNATURE_BASE)" >&2; exit 2; }
command -v yara >/dev/null || { echo "yara is not installed (apt-get install yara)" >&2; exit 2; }
[ -x "$agent" ] || { echo "$agent missing: cargo build --release --bins" >&2; exit 2; }
bare=${BARE:-$(dirname "$agent")/bare-yarax}
[ -x "$bare" ] || { echo "$bare missing: cargo build --release --bins" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
externals="-d filename= -d filepath= -d extension= -d filetype= -d owner="
# Each rule file in its own namespace, as Vedette does (signature-base reuses rule names).
yara_rules=()
i=0
for f in "$sb"/yara/*.yar "$sb"/yara/*.yara; do
    [ -e "$f" ] || continue
    i=$((i + 1))
    yara_rules+=("ns$i:$f")
done

bytes=$(du -sb $corpus 2>/dev/null | awk '{s += $1} END {print s}')
files=$(find $corpus -xdev -type f 2>/dev/null | wc -l)
echo "corpus: $corpus"
echo "        $files files, $((bytes / 1024 / 1024)) MiB; rules: $i YARA files from $sb"
echo "machine: $(nproc) cores, $(uname -r); yara $(yara --version); $($agent --version)"

# Warm the page cache so that both tools read from memory.
find $corpus -xdev -type f -size -64M -print0 2>/dev/null | xargs -0 cat > /dev/null 2>&1 || true

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc; }

run_yara() {
    local t0 t1
    t0=$(now)
    # yara takes one target per run: one run per corpus directory, times added up.
    : > "$work/yara.out"
    for dir in $corpus; do
        yara -r -p 2 "$@" -z 67108864 $externals "${yara_rules[@]}" "$dir" >> "$work/yara.out" 2> "$work/yara.err" || true
    done
    t1=$(now)
    secs "$t0" "$t1"
}
run_bare() {
    local t0 t1
    t0=$(now)
    "$bare" -p 2 --max-file-size 67108864 "$@" "$sb/yara" $corpus 2> "$work/bare.err" || true
    t1=$(now)
    secs "$t0" "$t1"
}
run_vedette() {
    local t0 t1
    t0=$(now)
    # Its own cache directory: compiled rules kept by the runs of this script only.
    XDG_CACHE_HOME="$work/xdg" "$agent" scan -p 2 --max-file-size 67108864 --rules "$sb/yara" --rules "$sb/iocs" "$@" $corpus \
        > "$work/vedette.out" 2> "$work/vedette.err" || true
    t1=$(now)
    secs "$t0" "$t1"
}

# Fill Vedette's compiled-rules cache (an empty directory: nothing scanned).
mkdir -p "$work/empty"
XDG_CACHE_HOME="$work/xdg" "$agent" scan --rules "$sb/yara" --rules "$sb/iocs" "$work/empty" 2>/dev/null || true

printf '\n%-4s %10s %10s %10s %10s %10s %10s %9s %9s %9s %9s\n' run "yara" "yara -f" "bare" "bare -f" \
    "vedette" "vedette*" "y/v" "y/v*" "y-f/v*" "bare-f/v*"
for r in $(seq "$runs"); do
    y=$(run_yara)
    yf=$(run_yara -f)
    b=$(run_bare)
    bf=$(run_bare --fast-scan)
    v=$(run_vedette --no-compiled-cache)
    w=$(run_vedette)
    printf '%-4s %9.2fs %9.2fs %9.2fs %9.2fs %9.2fs %9.2fs %8.2fx %8.2fx %8.2fx %8.2fx\n' "$r" \
        "$y" "$yf" "$b" "$bf" "$v" "$w" "$(echo "$y / $v" | bc -l)" "$(echo "$y / $w" | bc -l)" \
        "$(echo "$yf / $w" | bc -l)" "$(echo "$bf / $w" | bc -l)"
done
echo "(yara, yara -f: yara -r -p 2, without and with its fast matching mode; bare, bare -f: bare-yarax"
echo " without and with --fast-scan; vedette: rules compiled in the run; vedette*: compiled rules"
echo " kept by an earlier run. Vedette scans in fast-scan mode: a pattern that a condition only"
echo " tests for presence is searched for until its first match.)"
sed 's/^/bare: /' "$work/bare.err"
echo
echo "yara matches:    $(wc -l < "$work/yara.out") lines"
echo "vedette matches: $(grep -c . "$work/vedette.out" || true) detections"
grep '^loaded\|^scanned' "$work/vedette.err" | sed 's/^/vedette: /'

rm -f "$work/cache.bin" "$work/cache.bin.rules"
first=$(run_vedette --cache "$work/cache.bin")
second=$(run_vedette --cache "$work/cache.bin")
echo
printf 'vedette with cache: first scan %.2fs, second scan of the unchanged tree %.2fs: %.1fx faster\n' \
    "$first" "$second" "$(echo "$first / $second" | bc -l)"
grep '^scanned\|^rules not loaded' "$work/vedette.err" | sed 's/^/vedette (second): /'
