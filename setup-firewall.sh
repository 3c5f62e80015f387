#!/usr/bin/env bash
# setup-firewall.sh: send every container's EC2 metadata traffic to ec2metaproxy, on every
# Docker network there is or will be, and keep everything else away from the proxy port.
#
# No interface list: a TCP connection to the metadata address that enters the host from
# outside its own network stack (any bridge, any veth) is redirected to the proxy port on
# the address it came in on (nat PREROUTING, REDIRECT). The host's own processes go out
# through OUTPUT and keep reaching the real metadata service. The proxy port accepts only
# connections whose conntrack original destination is the metadata address (filter INPUT);
# anything to the metadata address that would still be forwarded is dropped (mangle
# FORWARD). With the proxy down a redirected connection is refused, never passed on.
#
# Every rule lives in chains of our own (EC2METAPROXY-DNAT, -INPUT, -FORWARD), jumped to
# once from the top of PREROUTING, INPUT and FORWARD. Each run rebuilds them in one
# iptables-restore transaction per address family: no moment without the redirect, and
# running it twice changes nothing. Nothing here depends on Docker or on an interface
# existing: run it at boot before dockerd starts; dockerd restarting leaves it alone.
set -euo pipefail

readonly PROG=${0##*/}
readonly DNAT_CHAIN=EC2METAPROXY-DNAT       # nat PREROUTING
readonly INPUT_CHAIN=EC2METAPROXY-INPUT     # filter INPUT
readonly FORWARD_CHAIN=EC2METAPROXY-FORWARD # mangle FORWARD
# An empty chain in a table this script was the first to create: --remove then deletes
# the table too once nothing else is in it (iptables-nft would leave it behind).
readonly CREATED_CHAIN=EC2METAPROXY-CREATED
readonly TABLES=(filter nat mangle)

usage() {
    cat <<EOF
Usage: $PROG [options]
       $PROG --remove [--dry-run]

Redirect every TCP connection to the EC2 metadata service (169.254.169.254:80, and
[fd00:ec2::254]:80 over IPv6) that arrives from outside the host's own network stack,
on any interface (every Docker network, created before or after this ran), to
ec2metaproxy's port on this host. Connections made by the host's own processes are left
alone. The proxy port accepts only such redirected connections. If the proxy is not
running, a redirected connection is refused; it never reaches the real service.

Options:
  --container-iface IFACE  optional restriction: only connections arriving on IFACE
                           (e.g. docker0) may reach the proxy; connections to the
                           metadata address from any other interface are rejected
                           (never passed through). Repeat for each one. The interface
                           need not exist yet. Default: every interface.
  --proxy-port PORT        port ec2metaproxy listens on (default 18000). The proxy must
                           listen on every address (its default, "listen": ":18000").
  --proxy-ip IP            send redirected IPv4 connections to IP instead of to the
                           address of the interface they arrive on. Not a loopback
                           address: the kernel will not DNAT forwarded traffic there.
  --metadata-ip IP         IPv4 metadata address to intercept (default 169.254.169.254).
  --metadata-ip6 IP        IPv6 metadata address to intercept (default fd00:ec2::254).
  --metadata-port PORT     metadata port to intercept (default 80).
  --no-ipv6                leave ip6tables alone.
  --remove                 delete the jumps and the EC2METAPROXY-* chains (IPv4 and
                           IPv6), and a table this script created if nothing else is in
                           it; nothing else. Other flags are ignored.
  --dry-run                print the iptables-restore input instead of applying it.
  -h, --help               show this help.

The proxy port is dropped for every direct connection, from containers, from other
machines and from the host itself (loopback included): nobody gets a container's
credentials by asking the proxy port. To look at the proxy from the host, run a
container: docker run --rm IMAGE wget -qO- http://169.254.169.254/

Needs root and iptables (and ip6tables unless --no-ipv6 or IPv6 is off).
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

# TOOL is iptables or ip6tables; SAVED is the output of its -save, read once per family
# before anything changes (a table that does not exist is not listed there).

table_exists() { # SAVED TABLE
    grep -qx "\*$2" <<<"$1"
}

chain_exists() { # TOOL TABLE CHAIN
    "$1" -w -t "$2" -S "$3" >/dev/null 2>&1
}

jump_positions() { # TOOL TABLE BUILTIN CHAIN: rule numbers of "-A BUILTIN -j CHAIN"
    "$1" -w -t "$2" -S "$3" 2>/dev/null | awk -v rule="-A $3 -j $4" '
        /^-A / { n++ }
        $0 == rule { print n }'
}

builtin_of() { # TABLE: the built-in chain our chain of TABLE hangs off, then our chain
    case $1 in
    filter) printf '%s %s\n' INPUT "$INPUT_CHAIN" ;;
    nat) printf '%s %s\n' PREROUTING "$DNAT_CHAIN" ;;
    mangle) printf '%s %s\n' FORWARD "$FORWARD_CHAIN" ;;
    esac
}

only_ours() { # SAVED TABLE: true when TABLE holds nothing but our chains, jumps and marker
    awk -v table="$2" -v prefix="EC2METAPROXY-" '
        /^\*/ { inside = ($0 == "*" table); next }
        !inside || /^#/ || $0 == "COMMIT" { next }
        /^:/ {
            name = substr($1, 2)
            if (index(name, prefix) == 1) next
            if ($2 != "ACCEPT") { other = 1 }   # a user chain ("-") or a DROP policy
            next
        }
        /^-A / {
            if (index($2, prefix) == 1) next
            if (NF == 4 && $3 == "-j" && index($4, prefix) == 1) next
            other = 1
        }
        END { exit other }' <<<"$1"
}

# Building iptables-restore input ###################################################

jump_lines() { # TOOL TABLE BUILTIN CHAIN: make the jump the first rule, exactly once
    local positions count i
    positions=$(jump_positions "$@")
    [[ $positions == 1 ]] && return
    count=$(printf '%s' "$positions" | grep -c . || true)
    for ((i = 0; i < count; i++)); do
        printf -- '-D %s -j %s\n' "$3" "$4"
    done
    printf -- '-I %s 1 -j %s\n' "$3" "$4"
}

apply_input() { # TOOL FAMILY(4|6) SAVED: restore input that installs our chains
    local tool=$1 family=$2 saved=$3 table builtin chain iface
    local metadata=$METADATA_IP/32 origin=$METADATA_IP redirect="REDIRECT --to-ports $PROXY_PORT"
    # Refused with an ICMP error, not a TCP reset: the kernel sends the reset for bridged
    # traffic straight out of the bridge port without undoing the redirect, and the
    # container never sees it.
    local reject=icmp-port-unreachable
    if [[ $family == 6 ]]; then
        metadata=$METADATA_IP6/128 origin=$METADATA_IP6 reject=icmp6-port-unreachable
    elif [[ -n $PROXY_IP ]]; then
        redirect="DNAT --to-destination $PROXY_IP:$PROXY_PORT"
    fi
    origin="-m conntrack --ctorigdst $origin --ctorigdstport $METADATA_PORT"

    for table in "${TABLES[@]}"; do
        read -r builtin chain < <(builtin_of "$table")
        printf '*%s\n:%s - [0:0]\n' "$table" "$chain"
        if ! table_exists "$saved" "$table" || chain_exists "$tool" "$table" "$CREATED_CHAIN"; then
            printf ':%s - [0:0]\n' "$CREATED_CHAIN"
        fi
        case $table in
        filter)
            # Redirected connections only; the rest of the proxy port is dropped.
            if ((${#IFACES[@]} == 0)); then
                printf -- '-A %s -p tcp -m tcp --dport %s %s -j ACCEPT\n' "$chain" "$PROXY_PORT" "$origin"
            else
                for iface in "${IFACES[@]}"; do
                    printf -- '-A %s -i %s -p tcp -m tcp --dport %s %s -j ACCEPT\n' \
                        "$chain" "$iface" "$PROXY_PORT" "$origin"
                done
                printf -- '-A %s -p tcp %s -j REJECT --reject-with %s\n' "$chain" "$origin" "$reject"
            fi
            printf -- '-A %s -p tcp -m tcp --dport %s -j DROP\n' "$chain" "$PROXY_PORT"
            ;;
        nat)
            # No -i: every interface, those that do not exist yet included.
            printf -- '-A %s -d %s -p tcp -m tcp --dport %s -j %s\n' \
                "$chain" "$metadata" "$METADATA_PORT" "$redirect"
            ;;
        mangle)
            # Only what escaped the redirect gets here: connections older than the rules,
            # or a rule someone put above our jump in nat PREROUTING.
            printf -- '-A %s -d %s -p tcp -m tcp --dport %s -j DROP\n' "$chain" "$metadata" "$METADATA_PORT"
            ;;
        esac
        jump_lines "$tool" "$table" "$builtin" "$chain"
        printf 'COMMIT\n'
    done
}

remove_input() { # TOOL SAVED DROP(0|1): restore input that deletes what we added to the
    # tables we keep (DROP=0), or names the tables to drop whole (DROP=1, applied
    # without --noflush: they hold nothing but what we added, and we created them).
    local tool=$1 saved=$2 drop=$3 table builtin chain count i ours
    for table in "${TABLES[@]}"; do
        table_exists "$saved" "$table" || continue
        read -r builtin chain < <(builtin_of "$table")
        ours=0
        if chain_exists "$tool" "$table" "$CREATED_CHAIN" && only_ours "$saved" "$table"; then
            ours=1
        fi
        if ((drop)); then
            ((ours)) && printf '*%s\nCOMMIT\n' "$table"
            continue
        fi
        ((ours)) && continue
        chain_exists "$tool" "$table" "$chain" || chain_exists "$tool" "$table" "$CREATED_CHAIN" || continue
        printf '*%s\n' "$table"
        count=$(jump_positions "$tool" "$table" "$builtin" "$chain" | grep -c . || true)
        for ((i = 0; i < count; i++)); do
            printf -- '-D %s -j %s\n' "$builtin" "$chain"
        done
        if chain_exists "$tool" "$table" "$chain"; then
            printf -- '-F %s\n-X %s\n' "$chain" "$chain"
        fi
        # Someone else's rules are in the table now: it is theirs too, keep it.
        if chain_exists "$tool" "$table" "$CREATED_CHAIN"; then
            printf -- '-X %s\n' "$CREATED_CHAIN"
        fi
        printf 'COMMIT\n'
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
    valid_port "$PROXY_PORT" || die "--proxy-port must be a number from 1 to 65535, not '$PROXY_PORT'"
    valid_port "$METADATA_PORT" || die "--metadata-port must be a number from 1 to 65535, not '$METADATA_PORT'"
    valid_ipv4 "$METADATA_IP" || die "--metadata-ip is not an IPv4 address: '$METADATA_IP'"
    valid_ipv6 "$METADATA_IP6" || die "--metadata-ip6 is not an IPv6 address: '$METADATA_IP6'"
    if [[ -n $PROXY_IP ]]; then
        valid_ipv4 "$PROXY_IP" || die "--proxy-ip is not an IPv4 address: '$PROXY_IP'"
        [[ $PROXY_IP != 127.* && $PROXY_IP != 0.0.0.0 ]] ||
            die "--proxy-ip $PROXY_IP cannot work: forwarded traffic cannot be DNATed to loopback; leave --proxy-ip out"
    fi
    declare -A seen=()
    unique=()
    for iface in "${IFACES[@]}"; do
        valid_iface_name "$iface" || die "not a valid interface name: '$iface'"
        [[ -z ${seen[$iface]:-} ]] || continue
        seen[$iface]=1
        unique+=("$iface")
    done
    IFACES=("${unique[@]}")
fi

# Environment #######################################################################

((EUID == 0)) || die "must run as root (iptables needs CAP_NET_ADMIN)"
for tool in iptables iptables-restore iptables-save; do
    command -v "$tool" >/dev/null || die "$tool not found in PATH (install iptables)"
done
# No IPv6 in the kernel (ipv6.disable=1) means nothing to redirect or protect there.
[[ -e /proc/net/if_inet6 ]] || IPV6=0
if ((IPV6)); then
    for tool in ip6tables ip6tables-restore ip6tables-save; do
        command -v "$tool" >/dev/null || die "$tool not found in PATH (install iptables, or pass --no-ipv6)"
    done
fi

FAMILIES=(4)
((IPV6)) && FAMILIES+=(6)

# Apply ###############################################################################

# Per family: NOFLUSH_FOR is applied with --noflush; DROP_FOR (--remove only) names the
# tables we created and that hold nothing else, flushed away whole.
declare -A NOFLUSH_FOR=() DROP_FOR=()
for family in "${FAMILIES[@]}"; do
    tool=iptables
    [[ $family == 6 ]] && tool=ip6tables
    saved=$("$tool-save") || die "$tool-save failed: cannot read the current rules"
    if ((REMOVE)); then
        NOFLUSH_FOR[$family]=$(remove_input "$tool" "$saved" 0)
        DROP_FOR[$family]=$(remove_input "$tool" "$saved" 1)
    else
        NOFLUSH_FOR[$family]=$(apply_input "$tool" "$family" "$saved")
        DROP_FOR[$family]=
    fi
done

restore_runs() { # print "FAMILY FLAGS" for each restore to run, in order
    local family
    for family in "${FAMILIES[@]}"; do
        [[ -z ${NOFLUSH_FOR[$family]} ]] || printf '%s --noflush\n' "$family"
        [[ -z ${DROP_FOR[$family]} ]] || printf '%s -\n' "$family"
    done
}

restore_input() { # FAMILY FLAGS
    if [[ $2 == --noflush ]]; then
        printf '%s\n' "${NOFLUSH_FOR[$1]}"
    else
        printf '%s\n' "${DROP_FOR[$1]}"
    fi
}

restore_tool() { # FAMILY
    if [[ $1 == 6 ]]; then echo ip6tables-restore; else echo iptables-restore; fi
}

mapfile -t RUNS < <(restore_runs)

if ((DRY_RUN)); then
    for run in "${RUNS[@]}"; do
        read -r family flags <<<"$run"
        shown=
        [[ $flags == --noflush ]] && shown=" $flags"
        printf "%s -w%s <<'EOF'\n%s\nEOF\n" "$(restore_tool "$family")" "$shown" "$(restore_input "$family" "$flags")"
    done
    exit 0
fi

# Parse-check everything before changing anything, so a bad rule leaves all tables alone.
for run in "${RUNS[@]}"; do
    read -r family flags <<<"$run"
    tool=$(restore_tool "$family")
    args=(-w --test)
    [[ $flags == --noflush ]] && args+=(--noflush)
    errors=$("$tool" "${args[@]}" <<<"$(restore_input "$family" "$flags")" 2>&1) ||
        die "$tool rejected the rules, nothing changed: $(head -n 1 <<<"$errors")"
done
for run in "${RUNS[@]}"; do
    read -r family flags <<<"$run"
    tool=$(restore_tool "$family")
    args=(-w)
    [[ $flags == --noflush ]] && args+=(--noflush)
    errors=$("$tool" "${args[@]}" <<<"$(restore_input "$family" "$flags")" 2>&1) ||
        die "$tool failed: $(head -n 1 <<<"$errors")"
done
