#!/usr/bin/env bash
# Vedette quick start: a collector on 127.0.0.1 and one enrolled agent on this machine, watching
# ./vedette-demo/watch with the rules in deploy/quickstart/rules.
#
#   deploy/quickstart.sh          build, then start (or restart) the collector and the agent
#   deploy/quickstart.sh stop     stop both
#
# Environment: VEDETTE_DEMO_DIR (default ./vedette-demo), VEDETTE_PORT (default 7443),
# VEDETTE_BIN_DIR (use binaries from there instead of building).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
demo=${VEDETTE_DEMO_DIR:-$PWD/vedette-demo}
port=${VEDETTE_PORT:-7443}

stop() {
    for name in agent collector; do
        pidfile="$demo/$name.pid"
        if [ -f "$pidfile" ]; then
            pid=$(cat "$pidfile")
            if kill -0 "$pid" 2>/dev/null; then
                kill -TERM "$pid"
                for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
                echo "stopped $name (pid $pid)"
            fi
            rm -f "$pidfile"
        fi
    done
}

if [ "${1:-start}" = "stop" ]; then
    stop
    exit 0
fi

if [ -n "${VEDETTE_BIN_DIR:-}" ]; then
    bin=$VEDETTE_BIN_DIR
else
    echo "building (the first build takes a while)..."
    (cd "$root" && cargo build --quiet --bins)
    bin=$root/target/debug
fi

stop
mkdir -p "$demo/watch"

if [ ! -f "$demo/collector/ca.key" ]; then
    "$bin/vedette-collector" init --dir "$demo/collector" --listen "127.0.0.1:$port" --with-maintainer-key > "$demo/init.txt"
fi
fingerprint=$(sed -n 's/^CA SHA-256 fingerprint: //p' "$demo/init.txt")
address=$(sed -n 's/^collector = "\(.*\)"$/\1/p' "$demo/collector/vedettectl.toml")
export VEDETTECTL_CONFIG=$demo/collector/vedettectl.toml

"$bin/vedette-collector" serve --config "$demo/collector/collector.toml" >> "$demo/collector.log" 2>&1 &
echo $! > "$demo/collector.pid"
for _ in $(seq 200); do
    if "$bin/vedettectl" agents list > /dev/null 2>&1; then break; fi
    if ! kill -0 "$(cat "$demo/collector.pid")" 2>/dev/null; then
        echo "the collector did not start; see $demo/collector.log" >&2
        tail -5 "$demo/collector.log" >&2
        exit 1
    fi
    sleep 0.1
done

if [ ! -f "$demo/agent/agent.toml" ]; then
    token=$("$bin/vedettectl" token create --ttl 10m)
    "$bin/vedette-agent" enroll --collector "$address" --token "$token" \
        --ca-sha256 "$fingerprint" --state-dir "$demo/agent" \
        --maintainer-key "$demo/collector/maintainer.pub"
fi

"$bin/vedette-agent" run --state-dir "$demo/agent" --watch "$demo/watch" \
    --rules "$root/deploy/quickstart/rules" >> "$demo/agent.log" 2>&1 &
echo $! > "$demo/agent.pid"
agent_id=$(sed -n 's/^agent_id = "\(.*\)"$/\1/p' "$demo/agent/agent.toml")
for _ in $(seq 200); do
    if "$bin/vedettectl" agents list --json | grep -q "\"connected\":true.*$agent_id\|$agent_id.*\"connected\":true"; then
        break
    fi
    sleep 0.1
done

cat <<MSG

Vedette is running: collector on $address, agent $agent_id watching $demo/watch
Logs: $demo/collector.log, $demo/agent.log

Try it:
  export VEDETTECTL_CONFIG=$demo/collector/vedettectl.toml
  echo 'VEDETTE-QUICKSTART-TEST' > $demo/watch/suspicious.txt
  $bin/vedettectl detections list
  $bin/vedettectl agents list

Stop: $0 stop
MSG
