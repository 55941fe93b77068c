# Sourced by the bench/run-*.sh scripts whose targets count in Redis (not
# run on its own): builds the `PROFILE` binaries (default `dist`, the build
# that ships: release with fat LTO and one codegen unit, about 10 minutes
# from scratch on 2 cores; docs/benchmarks.md, "The dist build";
# PROFILE=release measures the quicker build), installs redis-server with
# apt-get when it is missing (Debian or Ubuntu, as root or with sudo), and
# defines `results_header`, the lines every results file starts with.
PROFILE=${PROFILE:-dist}

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    echo "installing redis-server and redis-tools with apt-get" >&2
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq redis-server redis-tools
fi

cargo build --profile "$PROFILE" -p gatehouse -p gatehousectl -p gatehouse-bench

results_header() {
    echo "# $(date -u +%FT%TZ), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo
    echo "- build: cargo --profile $PROFILE"
    echo "- code: $(git describe --always --dirty 2>/dev/null || echo unknown)"
    echo "- $(uname -sr), $(rustc --version), $(redis-server --version)"
    echo
}
