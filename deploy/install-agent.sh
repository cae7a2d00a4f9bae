#!/bin/sh
# Installs, enrolls and starts the Vedette agent on this host. Idempotent: run it again
# (from Ansible, Salt, Puppet, cloud-init...) and it changes only what is missing or out of
# date; an enrolled host is never enrolled twice, so a spent token does no harm.
#
#   install-agent.sh --collector collector.example.org:7443 --ca-sha256 HEX \
#       --token-file /run/secrets/vedette-token [--deb vedette-agent_0.1.0-1_amd64.deb] \
#       [--maintainer-key alice.pub]... [--config agent.toml]
#
# Options:
#   --collector HOST:PORT    the collector agents connect to (required to enroll)
#   --ca-sha256 HEX          the collector CA's fingerprint, as `vedette-collector init` printed it
#   --token-file FILE        the enrollment token (or the VEDETTE_TOKEN variable); read only
#                            when the host is not enrolled yet
#   --maintainer-key FILE    a rule maintainer's public key to pin (repeatable; one of these
#                            or --maintainer-key-sha256 is needed to enroll)
#   --maintainer-key-sha256 HEX  or pin the key the collector offers with this SHA-256
#   --trust-collector-keys   pin whatever keys the collector offers (trials only: whoever
#                            controls the collector could then sign bundles this host runs)
#   --deb FILE               install this vedette-agent package (dpkg -i), or
#   --binary FILE            install this vedette-agent program into /usr/bin (and the unit)
#   --config FILE            use this agent.toml when /etc/vedette/agent.toml does not exist
#   --no-start               do not enable and start the service
#   --root DIR               install under DIR instead of / (for tests and images)
# Exit status: 0 when the agent is installed, enrolled and `vedette-agent doctor` finds no
# problem; otherwise what failed, with its message on stderr.
set -eu

collector= ca_sha256= token_file= deb= binary= config= start=yes root=
maintainer_args=
here=$(cd "$(dirname "$0")" && pwd)

die() { echo "install-agent: $*" >&2; exit 1; }
say() { echo "install-agent: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --collector) collector=$2; shift 2 ;;
        --ca-sha256) ca_sha256=$2; shift 2 ;;
        --token-file) token_file=$2; shift 2 ;;
        --maintainer-key) maintainer_args="$maintainer_args --maintainer-key $2"; shift 2 ;;
        --maintainer-key-sha256) maintainer_args="$maintainer_args --maintainer-key-sha256 $2"; shift 2 ;;
        --trust-collector-keys) maintainer_args="$maintainer_args --trust-collector-keys"; shift ;;
        --deb) deb=$2; shift 2 ;;
        --binary) binary=$2; shift 2 ;;
        --config) config=$2; shift 2 ;;
        --no-start) start=no; shift ;;
        --root) root=$2; shift 2 ;;
        -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[ "$(id -u)" = 0 ] || [ -n "$root" ] || die "run as root: the agent is installed system-wide"
state=$root/var/lib/vedette
etc=$root/etc/vedette
agent=$root/usr/bin/vedette-agent

# 1. The program (and its unit).
if [ -n "$deb" ]; then
    [ -z "$root" ] || die "--deb cannot be used with --root"
    dpkg -i "$deb" >/dev/null || die "dpkg -i $deb failed"
    say "installed $(dpkg-query -W -f='${Package} ${Version}' vedette-agent)"
elif [ -n "$binary" ]; then
    install -d -m 0755 "$root/usr/bin"
    if ! cmp -s "$binary" "$agent"; then
        install -m 0755 "$binary" "$agent"
        say "installed $agent"
    fi
    unit=$root/etc/systemd/system/vedette-agent.service
    if [ ! -e "$root/lib/systemd/system/vedette-agent.service" ] && [ -f "$here/systemd/vedette-agent.service" ] \
        && ! cmp -s "$here/systemd/vedette-agent.service" "$unit"; then
        install -d -m 0755 "$(dirname "$unit")"
        install -m 0644 "$here/systemd/vedette-agent.service" "$unit"
        say "installed $unit"
    fi
elif [ ! -x "$agent" ]; then
    die "$agent is not installed: give --deb FILE or --binary FILE"
fi

# 2. Configuration and directories.
install -d -m 0755 "$etc" "$etc/rules"
install -d -m 0700 "$state"
if [ ! -e "$etc/agent.toml" ]; then
    if [ -n "$config" ]; then
        install -m 0644 "$config" "$etc/agent.toml"
    elif [ -f "$here/agent.toml" ] && [ -n "$root" ]; then
        # Under --root, the example's /etc/vedette is the one under that root.
        sed "s#\"/etc/vedette/#\"$root/etc/vedette/#g" "$here/agent.toml" > "$etc/agent.toml"
        chmod 0644 "$etc/agent.toml"
    elif [ -f "$here/agent.toml" ]; then
        install -m 0644 "$here/agent.toml" "$etc/agent.toml"
    else
        die "no $etc/agent.toml: give --config FILE"
    fi
    say "wrote $etc/agent.toml"
fi

# 3. Enrollment, once.
if [ -f "$state/agent.toml" ]; then
    say "already enrolled ($(sed -n 's/^agent_id = //p' "$state/agent.toml" | tr -d '"')); not enrolling again"
else
    [ -n "$collector" ] || die "not enrolled yet: give --collector HOST:PORT"
    [ -n "$ca_sha256" ] || die "not enrolled yet: give --ca-sha256 HEX"
    [ -n "$maintainer_args" ] || die "not enrolled yet: give --maintainer-key FILE (a rule maintainer's public key to pin)"
    if [ -n "$token_file" ]; then
        [ -r "$token_file" ] || die "cannot read the token file $token_file"
        # shellcheck disable=SC2086
        "$agent" enroll --collector "$collector" --ca-sha256 "$ca_sha256" \
            --token-file "$token_file" --state-dir "$state" $maintainer_args
    elif [ -n "${VEDETTE_TOKEN:-}" ]; then
        # shellcheck disable=SC2086
        "$agent" enroll --collector "$collector" --ca-sha256 "$ca_sha256" \
            --state-dir "$state" $maintainer_args
    else
        die "not enrolled yet: give --token-file FILE or set VEDETTE_TOKEN"
    fi
fi

# 4. The service.
if [ "$start" = yes ]; then
    if [ -d /run/systemd/system ] && [ -z "$root" ]; then
        systemctl daemon-reload
        systemctl enable --now vedette-agent.service >/dev/null
        systemctl is-active --quiet vedette-agent.service || die "vedette-agent.service is not running: journalctl -u vedette-agent"
        say "vedette-agent.service is running"
    else
        say "no systemd here: start it with $agent run --state-dir $state --config $etc/agent.toml"
    fi
fi

# 5. The same checks an operator would run.
"$agent" doctor --state-dir "$state" --config "$etc/agent.toml"
