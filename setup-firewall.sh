#!/usr/bin/env bash
# setup-firewall.sh: send the EC2 metadata traffic of Docker containers to ec2metaproxy,
# and keep everything that is not a container away from the proxy port.
#
# Every rule lives in two chains of our own, EC2METAPROXY-DNAT (nat) and
# EC2METAPROXY-INPUT (filter), jumped to once from the top of PREROUTING and INPUT.
# Each run rebuilds both chains in one iptables-restore transaction per address family,
# so there is no moment without the redirect, and running it twice changes nothing.
# Run it at boot after dockerd has started, and again whenever a container bridge is added.
set -euo pipefail

readonly PROG=${0##*/}
readonly DNAT_CHAIN=EC2METAPROXY-DNAT
readonly INPUT_CHAIN=EC2METAPROXY-INPUT

usage() {
    cat <<EOF
Usage: $PROG --container-iface IFACE [--container-iface IFACE ...] [options]
       $PROG --remove [--dry-run]

Redirect TCP connections that containers make to the EC2 metadata service
(169.254.169.254:80, and fd00:ec2::254 over IPv6) to ec2metaproxy, and drop every
connection to the proxy port that does not arrive on a container interface.

Options:
  --container-iface IFACE  a bridge that containers sit behind, e.g. docker0 or the
                           br-... bridge of a user-defined network. Repeat for each
                           one. Required unless --remove. No wildcards.
  --proxy-port PORT        port ec2metaproxy listens on (default 18000).
  --proxy-ip IP            IPv4 address to send redirected traffic to, on every
                           interface (default: each interface's own first IPv4
                           address). Must not be a loopback address: the kernel will
                           not DNAT bridged traffic to loopback.
  --metadata-ip IP         IPv4 metadata address to intercept (default 169.254.169.254).
  --metadata-ip6 IP        IPv6 metadata address to intercept (default fd00:ec2::254).
                           Redirected only on interfaces that have a global IPv6
                           address, to that address.
  --metadata-port PORT     metadata port to intercept (default 80).
  --no-ipv6                leave ip6tables alone.
  --remove                 delete the jumps and the EC2METAPROXY-* chains (IPv4 and
                           IPv6) and nothing else. Other flags are ignored.
  --dry-run                print the iptables-restore input instead of applying it.
  -h, --help               show this help.

The proxy port is dropped for every interface other than those given, loopback
included: programs on the host itself get no container's credentials. To look at the
proxy from the host, run a container (docker run --rm IMAGE wget -qO- http://169.254.169.254/).

Needs root, iptables (and ip6tables unless --no-ipv6 or IPv6 is off) and iproute2.
EOF
}

die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

die_usage() {
    printf '%s: error: %s (see --help)\n' "$PROG" "$*" >&2
    exit 2
}

# Validation ######################################################################

valid_port() {
    [[ $1 =~ ^[1-9][0-9]{0,4}$ ]] && (($1 <= 65535))
}

valid_ipv4() {
    local IFS=. octet
    [[ $1 =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || return 1
    for octet in $1; do
        [[ $octet =~ ^(0|[1-9][0-9]*)$ ]] && ((octet <= 255)) || return 1
    done
}

valid_ipv6() {
    # Hex groups of 1..4 digits, at most one "::", eight groups when there is none.
    local addr=$1 head tail groups=0 group
    [[ $addr =~ ^[0-9A-Fa-f:]{2,39}$ ]] || return 1
    if [[ $addr == *::* ]]; then
        head=${addr%%::*}
        tail=${addr#*::}
        [[ $tail != *::* ]] || return 1
    else
        head=$addr
        tail=
    fi
    for group in ${head//:/ } ${tail//:/ }; do
        [[ $group =~ ^[0-9A-Fa-f]{1,4}$ ]] || return 1
        groups=$((groups + 1))
    done
    # Empty groups (":a" or "a:" outside "::") would vanish in the split above.
    [[ $head != :* && $head != *: && $tail != :* && $tail != *: ]] || return 1
    if [[ $addr == *::* ]]; then
        ((groups <= 7))
    else
        ((groups == 8))
    fi
}

valid_iface_name() {
    # What the kernel accepts and iptables can match, minus its "+" wildcard.
    [[ $1 =~ ^[A-Za-z0-9_.:@-]{1,15}$ ]]
}

# Reading the current state ##########################################################

iface_ipv4() {
    ip -4 -o addr show dev "$1" | awk '!found++ { sub(/\/.*/, "", $4); print $4 }'
}

iface_ipv6() {
    ip -6 -o addr show dev "$1" scope global |
        awk '!/dadfailed/ && !found++ { sub(/\/.*/, "", $4); print $4 }'
}

chain_exists() { # TOOL TABLE CHAIN
    "$1" -w -t "$2" -S "$3" >/dev/null 2>&1
}

jump_positions() { # TOOL TABLE BUILTIN CHAIN: rule numbers of "-A BUILTIN -j CHAIN"
    "$1" -w -t "$2" -S "$3" | awk -v rule="-A $3 -j $4" '
        /^-A / { n++ }
        $0 == rule { print n }'
}

# Building iptables-restore input ###################################################

jump_lines() { # TOOL TABLE BUILTIN CHAIN: make the jump the first rule, exactly once
    local positions count i
    chain_exists "$1" "$2" "$4" || {
        printf -- '-I %s 1 -j %s\n' "$3" "$4"
        return
    }
    positions=$(jump_positions "$@")
    [[ $positions == 1 ]] && return
    count=$(printf '%s' "$positions" | grep -c . || true)
    for ((i = 0; i < count; i++)); do
        printf -- '-D %s -j %s\n' "$3" "$4"
    done
    printf -- '-I %s 1 -j %s\n' "$3" "$4"
}

apply_input() { # TOOL FAMILY(4|6): restore input that installs our chains
    local tool=$1 family=$2 iface metadata to

    printf '*filter\n:%s - [0:0]\n' "$INPUT_CHAIN"
    for iface in "${IFACES[@]}"; do
        printf -- '-A %s -i %s -p tcp -m tcp --dport %s -j ACCEPT\n' \
            "$INPUT_CHAIN" "$iface" "$PROXY_PORT"
    done
    printf -- '-A %s -p tcp -m tcp --dport %s -j DROP\n' "$INPUT_CHAIN" "$PROXY_PORT"
    jump_lines "$tool" filter INPUT "$INPUT_CHAIN"
    printf 'COMMIT\n'

    printf '*nat\n:%s - [0:0]\n' "$DNAT_CHAIN"
    for iface in "${IFACES[@]}"; do
        if [[ $family == 4 ]]; then
            metadata=$METADATA_IP/32
            to=${TARGET4[$iface]}:$PROXY_PORT
        else
            [[ -n ${TARGET6[$iface]} ]] || continue
            metadata=$METADATA_IP6/128
            to=[${TARGET6[$iface]}]:$PROXY_PORT
        fi
        printf -- '-A %s -d %s -i %s -p tcp -m tcp --dport %s -j DNAT --to-destination %s\n' \
            "$DNAT_CHAIN" "$metadata" "$iface" "$METADATA_PORT" "$to"
    done
    jump_lines "$tool" nat PREROUTING "$DNAT_CHAIN"
    printf 'COMMIT\n'
}

remove_input() { # TOOL: restore input that deletes our jumps and chains, if any
    local tool=$1 table builtin chain count i
    for table in filter nat; do
        if [[ $table == filter ]]; then
            builtin=INPUT chain=$INPUT_CHAIN
        else
            builtin=PREROUTING chain=$DNAT_CHAIN
        fi
        chain_exists "$tool" "$table" "$chain" || continue
        printf '*%s\n' "$table"
        count=$(jump_positions "$tool" "$table" "$builtin" "$chain" | grep -c . || true)
        for ((i = 0; i < count; i++)); do
            printf -- '-D %s -j %s\n' "$builtin" "$chain"
        done
        printf -- '-F %s\n-X %s\nCOMMIT\n' "$chain" "$chain"
    done
}

# Arguments ########################################################################

IFACES=()
PROXY_PORT=18000
PROXY_IP=
METADATA_IP=169.254.169.254
METADATA_IP6=fd00:ec2::254
METADATA_PORT=80
IPV6=1
REMOVE=0
DRY_RUN=0

while (($# > 0)); do
    flag=$1
    value=
    inline=0
    case $flag in
    --*=*)
        value=${flag#*=}
        flag=${flag%%=*}
        inline=1
        shift
        ;;
    --container-iface | --proxy-port | --proxy-ip | --metadata-ip | --metadata-ip6 | --metadata-port)
        (($# >= 2)) || die_usage "$flag needs a value"
        value=$2
        shift 2
        ;;
    *)
        shift
        ;;
    esac
    case $flag in
    --container-iface) IFACES+=("$value") ;;
    --proxy-port) PROXY_PORT=$value ;;
    --proxy-ip) PROXY_IP=$value ;;
    --metadata-ip) METADATA_IP=$value ;;
    --metadata-ip6) METADATA_IP6=$value ;;
    --metadata-port) METADATA_PORT=$value ;;
    --no-ipv6 | --remove | --dry-run | -h | --help)
        ((!inline)) || die_usage "$flag takes no value"
        case $flag in
        --no-ipv6) IPV6=0 ;;
        --remove) REMOVE=1 ;;
        --dry-run) DRY_RUN=1 ;;
        *)
            usage
            exit 0
            ;;
        esac
        ;;
    *) die_usage "unknown argument: $flag" ;;
    esac
done

if ((!REMOVE)); then
    ((${#IFACES[@]} > 0)) || die_usage "at least one --container-iface is required"
    valid_port "$PROXY_PORT" || die "--proxy-port must be a number from 1 to 65535, not '$PROXY_PORT'"
    valid_port "$METADATA_PORT" || die "--metadata-port must be a number from 1 to 65535, not '$METADATA_PORT'"
    valid_ipv4 "$METADATA_IP" || die "--metadata-ip is not an IPv4 address: '$METADATA_IP'"
    valid_ipv6 "$METADATA_IP6" || die "--metadata-ip6 is not an IPv6 address: '$METADATA_IP6'"
    if [[ -n $PROXY_IP ]]; then
        valid_ipv4 "$PROXY_IP" || die "--proxy-ip is not an IPv4 address: '$PROXY_IP'"
        [[ $PROXY_IP != 127.* && $PROXY_IP != 0.0.0.0 ]] ||
            die "--proxy-ip $PROXY_IP cannot work: bridged traffic cannot be DNATed to loopback; use the bridge's own address"
    fi
    for iface in "${IFACES[@]}"; do
        valid_iface_name "$iface" || die "not a valid interface name: '$iface'"
    done
fi

# Environment #######################################################################

((EUID == 0)) || die "must run as root (iptables needs CAP_NET_ADMIN)"
for tool in ip iptables iptables-restore; do
    command -v "$tool" >/dev/null || die "$tool not found in PATH (install iproute2 and iptables)"
done
# No IPv6 in the kernel (ipv6.disable=1) means nothing to redirect or protect there.
[[ -e /proc/net/if_inet6 ]] || IPV6=0
if ((IPV6)); then
    for tool in ip6tables ip6tables-restore; do
        command -v "$tool" >/dev/null || die "$tool not found in PATH (install iptables, or pass --no-ipv6)"
    done
fi

FAMILIES=(4)
((IPV6)) && FAMILIES+=(6)

declare -A TARGET4=() TARGET6=()
if ((!REMOVE)); then
    declare -A seen=()
    unique=()
    for iface in "${IFACES[@]}"; do
        [[ -z ${seen[$iface]:-} ]] || continue
        seen[$iface]=1
        unique+=("$iface")
        ip link show dev "$iface" >/dev/null 2>&1 || die "interface $iface does not exist"
        TARGET4[$iface]=${PROXY_IP:-$(iface_ipv4 "$iface")}
        [[ -n ${TARGET4[$iface]} ]] ||
            die "interface $iface has no IPv4 address; give one with --proxy-ip"
        TARGET6[$iface]=
        if ((IPV6)); then
            TARGET6[$iface]=$(iface_ipv6 "$iface")
        fi
    done
    IFACES=("${unique[@]}")
fi

# Apply ###############################################################################

declare -A INPUT_FOR=()
for family in "${FAMILIES[@]}"; do
    tool=iptables
    [[ $family == 6 ]] && tool=ip6tables
    if ((REMOVE)); then
        INPUT_FOR[$family]=$(remove_input "$tool")
    else
        INPUT_FOR[$family]=$(apply_input "$tool" "$family")
    fi
done

if ((DRY_RUN)); then
    for family in "${FAMILIES[@]}"; do
        [[ -n ${INPUT_FOR[$family]} ]] || continue
        tool=iptables-restore
        [[ $family == 6 ]] && tool=ip6tables-restore
        printf "%s -w --noflush <<'EOF'\n%s\nEOF\n" "$tool" "${INPUT_FOR[$family]}"
    done
    exit 0
fi

# Parse-check every family before changing any, so a bad rule leaves all tables alone.
for family in "${FAMILIES[@]}"; do
    [[ -n ${INPUT_FOR[$family]} ]] || continue
    tool=iptables-restore
    [[ $family == 6 ]] && tool=ip6tables-restore
    errors=$("$tool" -w --noflush --test <<<"${INPUT_FOR[$family]}" 2>&1) ||
        die "$tool rejected the rules, nothing changed: $(head -n 1 <<<"$errors")"
done
for family in "${FAMILIES[@]}"; do
    [[ -n ${INPUT_FOR[$family]} ]] || continue
    tool=iptables-restore
    [[ $family == 6 ]] && tool=ip6tables-restore
    errors=$("$tool" -w --noflush <<<"${INPUT_FOR[$family]}" 2>&1) ||
        die "$tool failed: $(head -n 1 <<<"$errors")"
done
