#!/usr/bin/env bash
# netcluster.sh: an emulated cluster on one Linux machine. Each node is a network namespace n1..nN with
# one link of a set bandwidth: a veth pair (eth0 inside, cdmpi-v<i> outside) on the bridge cdmpi-br0,
# shaped in both directions by a token bucket (tc tbf). MPI ranks placed one per namespace reach each
# other over TCP through the kernel and these links only, so a job sees N nodes behind one switch with
# per-node links of RATE. Every node shares this machine's cores.
#
# Usage (as root):
#   bench/netcluster.sh up --nodes N --rate RATE   build n1..nN (1 <= N <= 250); RATE in tc syntax
#                                                   (100mbit, 1gbit, 10gbit, 2.5gbit, 125mbps) or none
#                                                   (unshaped). An existing cluster is torn down first.
#   bench/netcluster.sh down                        remove all of it (nothing up: exits 0)
#   bench/netcluster.sh status                      nodes and rate; exit 0 if up, 1 if not
#   bench/netcluster.sh mpiexec [MPIEXEC ARGS] [--] CMD...
#                                                   hydra's mpiexec with rank i on node n(i+1)
#                                                   (-n defaults to N; pass -n yourself for fewer)
#   bench/netcluster.sh check [--bytes 25000000] [--repeats 7]
#                                                   MPI Send/Recv n1 -> n2: measured rate against RATE
#   bench/netcluster.sh wrapper                     how mpiexec starts ranks in the namespaces
#   bench/netcluster.sh probe                       whether up can work here: exit 0, or 2 and the reason
#   bench/netcluster.sh --help
#
# Addresses: node i is 10.77.0.i/24 (/etc/hosts name n<i>, lines marked "# cdmpi-netcluster"), this
# machine is 10.77.0.254 on the bridge. State: /run/cdmpi-netcluster.env; the rsh wrapper mpiexec uses:
# /run/cdmpi-netcluster-rsh. Overrides: MPIEXEC (default: the mpiexec next to PYTHON, else on PATH),
# PYTHON (default: the repository's .venv/bin/python, else python3).
# Exit codes: 0 done; 1 failed (or, for status/check, not up / not within 10% of RATE); 2 refused
# (bad arguments, not root, no ip/tc, no kernel support for netns, veth, bridge or tbf).
set -euo pipefail

PROG=netcluster.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BRIDGE=cdmpi-br0
SUBNET=10.77.0
HOST_IP=$SUBNET.254
VETH=cdmpi-v          # host end of node i: cdmpi-v<i>; the inside end is eth0
MARK="# cdmpi-netcluster"
STATE=/run/cdmpi-netcluster.env
WRAPPER=/run/cdmpi-netcluster-rsh
MAX_NODES=250
TBF_ARGS=(burst 256kb latency 100ms)

die() { echo "$PROG: $*" >&2; exit 1; }
refuse() { echo "$PROG: $*" >&2; exit 2; }

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

# ---- arguments --------------------------------------------------------------------------------------

# RATE in tc's units, given with its unit: bit, kbit, mbit, gbit, tbit (or kibit... powers of 1024),
# bps, kbps, ... (bytes per second). Prints bits per second, or fails.
rate_bits() {
    local rate=${1,,} num unit scale
    [[ $rate =~ ^([0-9]+(\.[0-9]+)?)([kmgt]?i?)(bit|bps)$ ]] || return 1
    num=${BASH_REMATCH[1]} unit=${BASH_REMATCH[3]}
    [[ $unit == i ]] && return 1
    case $unit in
        "") scale=1 ;; k) scale=1e3 ;; m) scale=1e6 ;; g) scale=1e9 ;; t) scale=1e12 ;;
        ki) scale=1024 ;; mi) scale=1048576 ;; gi) scale=1073741824 ;; ti) scale=1099511627776 ;;
    esac
    [[ ${BASH_REMATCH[4]} == bps ]] && scale="$scale*8"
    awk -v n="$num" "BEGIN { b = n * $scale; if (b < 8000) exit 1; printf \"%.0f\\n\", b }"
}

# ---- checks -----------------------------------------------------------------------------------------

require_root_and_tools() {
    [[ $(id -u) -eq 0 ]] || refuse "must run as root (it creates namespaces, links and qdiscs, and edits /etc/hosts)"
    command -v ip >/dev/null || refuse "no 'ip' command (install iproute2)"
    command -v tc >/dev/null || refuse "no 'tc' command (install iproute2)"
    command -v unshare >/dev/null || refuse "no 'unshare' command (install util-linux)"
}

# Kernel support, by trying: a namespace, a veth pair into it, a bridge, a tbf qdisc. Removes its probes.
probe_kernel() {  # [RATE]: and that tc takes this rate
    local rate=${1:-none} ns=cdmpi-probe-ns br=cdmpi-probe-br v=cdmpi-probe-v why=""
    ip link del "$br" 2>/dev/null || true; ip link del "$v" 2>/dev/null || true; ip netns del "$ns" 2>/dev/null || true
    if ! ip netns add "$ns" 2>/dev/null; then
        why="network namespaces are not supported here (ip netns add failed)"
    elif ! ip link add "$br" type bridge 2>/dev/null; then
        why="bridges are not supported here (ip link add type bridge failed; module bridge)"
    elif ! ip link add "$v" type veth peer name eth0 netns "$ns" 2>/dev/null; then
        why="veth pairs are not supported here (ip link add type veth failed; module veth)"
    elif ! ip link set "$v" master "$br" 2>/dev/null; then
        why="a veth cannot join a bridge here (ip link set master failed)"
    elif ! tc qdisc add dev "$v" root tbf rate 1gbit "${TBF_ARGS[@]}" 2>/dev/null; then
        why="the tbf qdisc is not supported here (tc qdisc add ... tbf failed; module sch_tbf)"
    elif [[ $rate != none ]] && ! tc qdisc replace dev "$v" root tbf rate "$rate" "${TBF_ARGS[@]}" 2>/dev/null; then
        why="up: malformed rate '$rate': tc does not take it (e.g. 100mbit, 1gbit, 10gbit; or none)"
    fi
    ip link del "$v" 2>/dev/null || true; ip link del "$br" 2>/dev/null || true; ip netns del "$ns" 2>/dev/null || true
    [[ -z $why ]] || refuse "$why"
}

# ---- state ------------------------------------------------------------------------------------------

read_state() {  # sets NODES, RATE, STATUS from the state file; returns 1 when there is none
    NODES="" RATE="" STATUS=""
    [[ -f $STATE ]] || return 1
    local key value
    while IFS='=' read -r key value; do
        case $key in NODES) NODES=$value ;; RATE) RATE=$value ;; STATUS) STATUS=$value ;; esac
    done < "$STATE"
    [[ $NODES =~ ^[0-9]+$ ]] || NODES=""
}

write_state() {  # NODES RATE STATUS
    printf 'NODES=%s\nRATE=%s\nSTATUS=%s\nBRIDGE=%s\nSUBNET=%s.0/24\n' "$1" "$2" "$3" "$BRIDGE" "$SUBNET" > "$STATE"
}

# /etc/hosts is rewritten in place (it may be a bind mount, which mv or sed -i would break).
hosts_remove() {
    [[ -f /etc/hosts ]] || return 0
    grep -q -- "$MARK\$" /etc/hosts || return 0
    local kept
    kept=$(grep -v -- "$MARK\$" /etc/hosts || true)
    printf '%s\n' "$kept" > /etc/hosts
}

hosts_add() {  # N
    local i lines=""
    [[ -s /etc/hosts && $(tail -c 1 /etc/hosts) != "" ]] && lines=$'\n'  # the last line ends first
    for ((i = 1; i <= $1; i++)); do lines+="$SUBNET.$i n$i $MARK"$'\n'; done
    printf '%s' "$lines" >> /etc/hosts
}

# ---- teardown ---------------------------------------------------------------------------------------

# The namespaces to remove: those the state file names, and any n<i> whose eth0 holds 10.77.0.<i> (a
# cluster whose state file was lost). Other namespaces called n<i> are left alone.
our_namespaces() {
    local name i listed=" "
    if read_state && [[ -n $NODES ]]; then
        for ((i = 1; i <= NODES; i++)); do listed+="n$i "; done
    fi
    for name in $(ip netns list 2>/dev/null | awk '{print $1}'); do
        [[ $name =~ ^n([0-9]+)$ ]] || continue
        if [[ $listed == *" $name "* ]] \
            || ip -n "$name" -o -4 addr show dev eth0 2>/dev/null | grep -q " $SUBNET.${BASH_REMATCH[1]}/24 "; then
            echo "$name"
        fi
    done
}

our_links() {  # the bridge, the host ends cdmpi-v<i>, and leftover probes
    ip -o link show 2>/dev/null | awk -F': ' '{sub(/@.*/, "", $2); print $2}' \
        | grep -E "^(${BRIDGE}|${VETH}[0-9]+|cdmpi-probe-(br|v))\$" || true
}

teardown() {
    local ns pids link
    for ns in $(our_namespaces); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)  # ranks left running in the node
        if [[ -n $pids ]]; then
            kill -TERM $pids 2>/dev/null || true; sleep 0.5
            pids=$(ip netns pids "$ns" 2>/dev/null || true)
            [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
        fi
        ip netns del "$ns" 2>/dev/null || true
    done
    ip netns del cdmpi-probe-ns 2>/dev/null || true
    for link in $(our_links); do ip link del "$link" 2>/dev/null || true; done  # qdiscs go with them
    hosts_remove
    rm -f "$STATE" "$WRAPPER" 2>/dev/null || true
}

# ---- up ---------------------------------------------------------------------------------------------

write_wrapper() {
    cat > "$WRAPPER" <<'EOF'
#!/bin/bash
# Written by bench/netcluster.sh: the "remote shell" of MPICH hydra's rsh launcher for the emulated cluster.
# hydra runs it as `WRAPPER HOST WORD...` (an ssh/rsh-like launcher may add options before HOST); the
# words are one shell command line (the hydra_pmi_proxy command, its path in double quotes). It runs that
# line in namespace HOST, in a UTS namespace of its own whose hostname is HOST, so that the ranks there
# (socket.gethostname(), MPI_Get_processor_name) see the node they are on.
set -euo pipefail
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in -l|-p|-i|-o|-F) shift 2 ;; *) shift ;; esac
done
[[ $# -ge 2 ]] || { echo "cdmpi-netcluster-rsh: usage: $0 HOST COMMAND..." >&2; exit 255; }
host=$1; shift
if ! [[ $host =~ ^n[0-9]+$ ]] || ! ip netns list | awk '{print $1}' | grep -qx "$host"; then
    echo "cdmpi-netcluster-rsh: no node '$host' in the emulated cluster (bench/netcluster.sh status)" >&2
    exit 255
fi
exec ip netns exec "$host" unshare --uts -- /bin/bash -c "hostname $host && exec $*"
EOF
    chmod 755 "$WRAPPER"
}

build() {  # N RATE
    local n=$1 rate=$2 i ns
    write_state "$n" "$rate" building   # first, so that a killed up is found and cleaned by down
    ip link add "$BRIDGE" type bridge
    ip addr add "$HOST_IP/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for ((i = 1; i <= n; i++)); do
        ns=n$i
        ip netns add "$ns"
        ip link add "$VETH$i" type veth peer name eth0 netns "$ns"
        ip link set "$VETH$i" master "$BRIDGE"
        ip link set "$VETH$i" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" route add default via "$HOST_IP" dev eth0
        if [[ $rate != none ]]; then
            tc qdisc add dev "$VETH$i" root tbf rate "$rate" "${TBF_ARGS[@]}"             # into node i
            ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$rate" "${TBF_ARGS[@]}" # out of node i
        fi
    done
    hosts_add "$n"
    write_wrapper
    write_state "$n" "$rate" up
}

cmd_up() {
    local nodes="" rate=""
    while [[ $# -gt 0 ]]; do
        case $1 in
            --nodes) [[ $# -ge 2 ]] || refuse "--nodes needs a value"; nodes=$2; shift 2 ;;
            --nodes=*) nodes=${1#*=}; shift ;;
            --rate) [[ $# -ge 2 ]] || refuse "--rate needs a value"; rate=$2; shift 2 ;;
            --rate=*) rate=${1#*=}; shift ;;
            *) refuse "up: unknown argument '$1' (usage: up --nodes N --rate RATE)" ;;
        esac
    done
    [[ -n $nodes ]] || refuse "up: --nodes N is required (1 to $MAX_NODES)"
    [[ -n $rate ]] || refuse "up: --rate RATE is required (e.g. 100mbit, 1gbit, 10gbit, or none)"
    [[ $nodes =~ ^[0-9]+$ ]] && ((10#$nodes >= 1 && 10#$nodes <= MAX_NODES)) \
        || refuse "up: --nodes '$nodes' must be a whole number from 1 to $MAX_NODES"
    nodes=$((10#$nodes))
    if [[ $rate != none ]]; then
        rate_bits "$rate" >/dev/null \
            || refuse "up: malformed rate '$rate' (tc syntax with a unit, at least 1kbps: e.g. 100mbit, 1gbit, 10gbit; or none)"
    fi
    require_root_and_tools
    probe_kernel "$rate"
    local i names ours
    names=" $(ip netns list 2>/dev/null | awk '{print $1}' | tr '\n' ' ') "
    ours=" $(our_namespaces | tr '\n' ' ') "
    for ((i = 1; i <= nodes; i++)); do
        [[ $names != *" n$i "* || $ours == *" n$i "* ]] \
            || refuse "up: a namespace n$i exists that is not this cluster's (ip netns list); remove it first"
    done
    teardown        # up on an existing (or half-built) cluster: start from nothing
    # A failed command (set -e) or a signal ends the script through this EXIT trap: it removes what up built.
    trap 'rc=$?; if ((rc)); then echo "$PROG: up failed (exit $rc); removing what it built" >&2; teardown; fi' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    build "$nodes" "$rate"
    trap - EXIT INT TERM
    echo "up: $nodes nodes n1..n$nodes ($SUBNET.1-$SUBNET.$nodes), rate $rate, bridge $BRIDGE $HOST_IP/24"
}

cmd_down() {
    [[ $# -eq 0 ]] || refuse "down takes no arguments"
    require_root_and_tools
    local had=""
    [[ -f $STATE || -n $(our_links) || -n $(our_namespaces) ]] && had=1
    teardown
    if [[ -n $had ]]; then echo "down: removed the emulated cluster"; else echo "down: nothing was up"; fi
}

# Exit 0 when the state file says up and its bridge and namespaces exist.
cluster_up() {
    read_state && [[ $STATUS == up && -n $NODES ]] || return 1
    ip link show "$BRIDGE" >/dev/null 2>&1 || return 1
    local i names
    names=" $(ip netns list 2>/dev/null | awk '{print $1}' | tr '\n' ' ') "
    for ((i = 1; i <= NODES; i++)); do [[ $names == *" n$i "* ]] || return 1; done
    [[ -x $WRAPPER ]]
}

cmd_status() {
    [[ $# -eq 0 ]] || refuse "status takes no arguments"
    if cluster_up; then
        echo "up"
        echo "nodes: $NODES (n1..n$NODES, $SUBNET.1-$SUBNET.$NODES)"
        echo "rate: $RATE"
        echo "bridge: $BRIDGE $HOST_IP/24"
        return 0
    fi
    if [[ -f $STATE || -n $(our_links) ]]; then
        echo "not up: a partly built or partly removed cluster is left (run: $PROG down)"
    else
        echo "not up"
    fi
    return 1
}

# ---- mpiexec ----------------------------------------------------------------------------------------

find_tools() {  # PYTHON, MPIEXEC: absolute paths (ranks start in another namespace, from hydra)
    if [[ -z ${PYTHON:-} ]]; then
        if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
    fi
    PYTHON=$(command -v "$PYTHON") || refuse "no python '$PYTHON' (set PYTHON)"
    if [[ -z ${MPIEXEC:-} ]]; then
        MPIEXEC=$(dirname "$PYTHON")/mpiexec
        [[ -x $MPIEXEC ]] || MPIEXEC=$(command -v mpiexec || true)
    fi
    [[ -n $MPIEXEC ]] && MPIEXEC=$(command -v "$MPIEXEC") || refuse "no mpiexec found (set MPIEXEC)"
}

# The hydra options that place the ranks: the rsh launcher through the wrapper, one rank per node in the
# order n1, n2, ..., the control connection to this machine's bridge address, and TCP between ranks.
mpiexec_options() {
    local hosts="" i
    for ((i = 1; i <= NODES; i++)); do hosts+="${hosts:+,}n$i"; done
    MPI_OPTS=(-localhost "$HOST_IP" -launcher rsh -launcher-exec "$WRAPPER" -hosts "$hosts" -ppn 1
              -genv UCX_TLS "${UCX_TLS:-tcp,self}" -genv UCX_NET_DEVICES "${UCX_NET_DEVICES:-eth0}"
              -genv FI_PROVIDER "${FI_PROVIDER:-tcp}")
}

cmd_mpiexec() {
    require_root_and_tools
    cluster_up || die "no cluster is up (bench/netcluster.sh up --nodes N --rate RATE)"
    find_tools
    local args=() has_n="" a seen=""
    for a in "$@"; do  # MPIEXEC ARGS up to the first --, which is dropped; -n / -np among them
        if [[ -z $seen ]]; then
            case $a in -n|-np) has_n=1 ;; --) seen=1; continue ;; esac
        fi
        args+=("$a")
    done
    [[ ${#args[@]} -gt 0 ]] || refuse "mpiexec: no command (usage: mpiexec [MPIEXEC ARGS] [--] CMD...)"
    mpiexec_options
    [[ -n $has_n ]] || MPI_OPTS+=(-n "$NODES")
    exec "$MPIEXEC" "${MPI_OPTS[@]}" "${args[@]}"
}

# ---- check ------------------------------------------------------------------------------------------

measure() {  # BYTES REPEATS: prints "BEST MEDIAN" bits per second n1 -> n2
    local out
    out=$("$MPIEXEC" "${MPI_OPTS[@]}" -n 2 "$PYTHON" "$REPO/bench/netcluster_check.py" \
          --bytes "$1" --repeats "$2") || die "the MPI transfer n1 -> n2 failed"
    echo "$out" | awk '/^best_bits_per_s / {b = $2} /^median_bits_per_s / {m = $2} END {if (b == "" || m == "") exit 1; print b, m}' \
        || die "the MPI check printed no result: $out"
}

gbit() { awk -v b="$1" 'BEGIN { printf (b < 1e9 ? "%.3f" : "%.2f"), b / 1e9 }'; }

cmd_check() {
    local bytes=25000000 repeats=7
    while [[ $# -gt 0 ]]; do
        case $1 in
            --bytes) [[ $# -ge 2 ]] || refuse "--bytes needs a value"; bytes=$2; shift 2 ;;
            --repeats) [[ $# -ge 2 ]] || refuse "--repeats needs a value"; repeats=$2; shift 2 ;;
            *) refuse "check: unknown argument '$1' (usage: check [--bytes 25000000] [--repeats 7])" ;;
        esac
    done
    [[ $bytes =~ ^[0-9]+$ && $bytes -ge 1000 ]] || refuse "check: --bytes must be a whole number >= 1000"
    [[ $repeats =~ ^[0-9]+$ && $repeats -ge 1 ]] || refuse "check: --repeats must be a whole number >= 1"
    require_root_and_tools
    cluster_up || die "no cluster is up (bench/netcluster.sh up --nodes N --rate RATE)"
    ((NODES >= 2)) || die "check needs 2 nodes or more (the cluster has $NODES)"
    find_tools
    mpiexec_options
    local measured median want
    read -r measured median < <(measure "$bytes" "$repeats")
    [[ -n $measured ]] || exit 1
    echo "measured $(gbit "$measured") Gbit/s n1 -> n2 at rate $RATE (MPI Send/Recv of $bytes bytes:" \
         "best of $repeats; median $(gbit "$median") Gbit/s)"
    [[ $RATE == none ]] && { echo "unshaped links: nothing to compare with"; return 0; }
    want=$(rate_bits "$RATE")
    if awk -v m="$measured" -v w="$want" 'BEGIN { exit !(m >= 0.9 * w && m <= 1.1 * w) }'; then
        echo "ok: within 10% of $(gbit "$want") Gbit/s"
        return 0
    fi
    if awk -v m="$measured" -v w="$want" 'BEGIN { exit !(m > 1.1 * w) }'; then
        echo "$PROG: measured $(gbit "$measured") Gbit/s at rate $RATE: above the rate by more than 10%;" \
             "the shaping does not hold (tc qdisc show)" >&2
        return 1
    fi
    # Below the rate: what do these cores carry with n1's and n2's links unshaped? (restored after)
    local unshaped i
    trap 'restore_shaping' EXIT INT TERM
    for i in 1 2; do
        tc qdisc del dev "$VETH$i" root 2>/dev/null || true
        ip netns exec "n$i" tc qdisc del dev eth0 root 2>/dev/null || true
    done
    read -r unshaped _ < <(measure "$bytes" "$repeats")
    restore_shaping
    trap - EXIT INT TERM
    echo "$PROG: measured $(gbit "$measured") Gbit/s at rate $RATE: below the rate by more than 10%;" \
         "these cores carry at most ${unshaped:+$(gbit "$unshaped") Gbit/s }n1 -> n2 with the links unshaped" >&2
    return 1
}

restore_shaping() {
    local i
    for i in 1 2; do
        tc qdisc replace dev "$VETH$i" root tbf rate "$RATE" "${TBF_ARGS[@]}" 2>/dev/null || true
        ip netns exec "n$i" tc qdisc replace dev eth0 root tbf rate "$RATE" "${TBF_ARGS[@]}" 2>/dev/null || true
    done
}

# ---- wrapper ----------------------------------------------------------------------------------------

cmd_wrapper() {
    cat <<EOF
How '$PROG mpiexec' places ranks: MPICH hydra's rsh launcher, with this script's wrapper as the remote
shell. The command it runs is

  \${MPIEXEC:-mpiexec} -localhost $HOST_IP -launcher rsh -launcher-exec $WRAPPER \\
      -hosts n1,...,nN -ppn 1 -genv UCX_TLS tcp,self -genv UCX_NET_DEVICES eth0 -genv FI_PROVIDER tcp \\
      -n N CMD...

- hydra starts one hydra_pmi_proxy per host by running
      $WRAPPER n<i> "/path/to/hydra_pmi_proxy" --control-port $HOST_IP:PORT ... --proxy-id <i-1>
  (the host, then one shell command line split into words; the proxy's path comes in double quotes).
  The wrapper skips any ssh-like options before the host and runs
      ip netns exec n<i> unshare --uts -- bash -c "hostname n<i> && exec WORDS..."
  so the proxy, and the ranks it forks, live in node n<i> with hostname n<i>.
- -localhost $HOST_IP: the proxies connect back to mpiexec at the bridge address (this machine's own
  hostname resolves to 127.0.0.1, which inside a namespace is the namespace's own loopback).
- -hosts n1,...,nN -ppn 1: rank i on node n(i+1). MPICH takes its map of nodes from these hosts, so it
  uses no shared memory of its own between them; the hostname the wrapper sets lets programs that ask
  (socket.gethostname(), MPI_Get_processor_name, cdmpi's hosts attribute) see N nodes too.
- UCX_TLS=tcp,self and UCX_NET_DEVICES=eth0 (MPICH over UCX, the PyPI wheel's default), FI_PROVIDER=tcp
  (MPICH over libfabric): ranks talk over TCP on eth0, that is over the shaped links. The namespaces share
  /dev/shm and the kernel, and UCX, whatever the hostnames, otherwise reaches the other ranks through
  shared memory (sysv, cma) and bypasses the links. Set UCX_TLS, UCX_NET_DEVICES or FI_PROVIDER in the
  environment to use other values.
- The rest of the environment goes to every rank (hydra's default, -genvall), as does the working
  directory; give the command with absolute paths (e.g. $REPO/.venv/bin/cdmpi).

The wrapper is written by 'up' to $WRAPPER and removed by 'down'.
EOF
    if [[ -f $WRAPPER ]]; then echo; echo "--- $WRAPPER"; cat "$WRAPPER"; fi
}

# ---- main -------------------------------------------------------------------------------------------

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
command=$1; shift
case $command in
    -h|--help|help) usage ;;
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    status) cmd_status "$@" ;;
    mpiexec) cmd_mpiexec "$@" ;;
    check) cmd_check "$@" ;;
    wrapper) cmd_wrapper "$@" ;;
    probe) [[ $# -eq 0 ]] || refuse "probe takes no arguments"
           require_root_and_tools; probe_kernel; echo "probe: root, ip, tc, netns, veth, bridge and tbf all work here" ;;
    *) refuse "unknown command '$command' (up, down, status, mpiexec, check, wrapper, probe; --help)" ;;
esac
