#!/usr/bin/env bash
# memhp-ci.sh: every command memhp's CI templates run (GitHub Actions, GitLab CI, KernelCI).
# The templates under ci/ only set variables and call this script, so a pipeline can be
# reproduced on any machine: run the same subcommands with the same variables.
#
#   ci/memhp-ci.sh setup            install what memhp needs (Debian packages, the venv): make deps venv
#   ci/memhp-ci.sh shards N         print ["1/N", ..., "N/N"] (and shards=... into $GITHUB_OUTPUT)
#   ci/memhp-ci.sh run              one job of the matrix: one kernel, one shard -> $MEMHP_OUT/<job>/
#   ci/memhp-ci.sh merge            merge every job's report.json -> $MEMHP_OUT/merged/ (report.json,
#                                   junit.xml, kcidb.json, ktap.txt, summary.md)
#   ci/memhp-ci.sh summary REPORT   the kernel x scenario table (markdown) -> $GITHUB_STEP_SUMMARY or stdout
#   ci/memhp-ci.sh kcidb-submit     send $MEMHP_OUT/merged/kcidb.json to KernelCI's KCIDB (kcidb-submit)
#
# Variables (all optional but the kernel):
#   MEMHP_KERNEL     a kernel spec (debian:6.12, debian-src:6.1, a build folder); or
#   MEMHP_TREE, MEMHP_REF   a git tree and ref, cloned and built with `memhp kernel build`
#   MEMHP_SHARD      I/N: this job's shard
#   MEMHP_K          a -k expression selecting scenarios
#   MEMHP_FRAGMENTS, MEMHP_PATCHES   space-separated kconfig fragments / patches (debian-src: or MEMHP_TREE)
#   MEMHP_BASELINE   an earlier report.json (or run folder): new failures are reported as new
#   MEMHP_FAIL_ON    any (default) or new: with a baseline, only new failures fail the job
#   MEMHP_DURATIONS  a report.json whose durations balance the shards (default: the baseline's)
#   MEMHP_JOBS       parallel guests (memhp run --jobs)
#   MEMHP_OUT        output folder (default memhp-out); MEMHP_JOB its job subfolder (default from kernel+shard)
#   MEMHP            the memhp command (default: .venv/bin/memhp when present, else memhp)
#   KCIDB_PROJECT, KCIDB_TOPIC   where kcidb-submit publishes; credentials in GOOGLE_APPLICATION_CREDENTIALS
#                    (a key file) or KCIDB_CREDENTIALS_JSON (the key itself, from a CI secret)
#
# Exit status: `run` exits as `memhp run` does (0 pass, 1 kernel failure, 2 bad input, 3
# infrastructure); `merge` 0 when the reports fit together, 2 on an overlap or a gap.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${MEMHP_OUT:-memhp-out}
if [[ -z "${MEMHP:-}" ]]; then
    if [[ -x "$here/.venv/bin/memhp" ]]; then MEMHP="$here/.venv/bin/memhp"; else MEMHP=memhp; fi
fi

die() { echo "memhp-ci: $*" >&2; exit 2; }
split() { local w; for w in $1; do printf '%s\n' "$w"; done; }   # space-separated list -> lines

job_name() {
    local k=${MEMHP_KERNEL:-${MEMHP_TREE:+tree-${MEMHP_REF:-HEAD}}}
    local name
    name=$(printf '%s' "${k:-default}" | tr -c 'A-Za-z0-9_.-' '_' | sed 's/^_*//; s/_*$//')
    [[ -n "${MEMHP_SHARD:-}" ]] && name="$name-shard-${MEMHP_SHARD%/*}-of-${MEMHP_SHARD#*/}"
    printf '%s' "${MEMHP_JOB:-$name}"
}

cmd_setup() {
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    $sudo make -C "$here" deps venv
}

cmd_shards() {
    local n=${1:-}
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "shards N: N must be a positive whole number, not '${n}'"
    local i json="["
    for ((i = 1; i <= n; i++)); do json+="\"$i/$n\""; ((i < n)) && json+=", "; done
    json+="]"
    echo "$json"
    if [[ -n "${GITHUB_OUTPUT:-}" ]]; then echo "shards=$json" >> "$GITHUB_OUTPUT"; fi
}

kernel_spec() {
    # The kernel to test: MEMHP_KERNEL, or MEMHP_TREE at MEMHP_REF built by memhp (cached by tree state).
    if [[ -n "${MEMHP_TREE:-}" ]]; then
        local src="$out/src"
        if [[ ! -d "$src/.git" ]]; then
            git clone --quiet --depth 1 --branch "${MEMHP_REF:-master}" "$MEMHP_TREE" "$src" >&2
        fi
        local args=(kernel build --tree "$src")
        local f
        while read -r f; do [[ -n "$f" ]] && args+=(--fragment "$f"); done < <(split "${MEMHP_FRAGMENTS:-}")
        while read -r f; do [[ -n "$f" ]] && args+=(--patch "$f"); done < <(split "${MEMHP_PATCHES:-}")
        "$MEMHP" "${args[@]}"
    else
        [[ -n "${MEMHP_KERNEL:-}" ]] || die "set MEMHP_KERNEL (a kernel spec) or MEMHP_TREE and MEMHP_REF"
        printf '%s\n' "$MEMHP_KERNEL"
    fi
}

cmd_run() {
    local job dir spec
    job=$(job_name)
    dir="$out/$job"
    mkdir -p "$dir"
    spec=$(kernel_spec) || exit $?
    local args=(run --kernel "$spec" --artifacts "$dir/run" --json "$dir/report.json" --junit "$dir/junit.xml"
                --kcidb "$dir/kcidb.json" --ktap "$dir/ktap.txt")
    [[ -n "${MEMHP_SHARD:-}" ]] && args+=(--shard "$MEMHP_SHARD")
    [[ -n "${MEMHP_K:-}" ]] && args+=(-k "$MEMHP_K")
    [[ -n "${MEMHP_BASELINE:-}" ]] && args+=(--baseline "$MEMHP_BASELINE")
    [[ -n "${MEMHP_FAIL_ON:-}" ]] && args+=(--fail-on "$MEMHP_FAIL_ON")
    [[ -n "${MEMHP_DURATIONS:-}" ]] && args+=(--durations-from "$MEMHP_DURATIONS")
    [[ -n "${MEMHP_JOBS:-}" ]] && args+=(--jobs "$MEMHP_JOBS")
    if [[ -z "${MEMHP_TREE:-}" ]]; then     # a tree's fragments and patches went into its build
        local f
        while read -r f; do [[ -n "$f" ]] && args+=(--fragment "$f"); done < <(split "${MEMHP_FRAGMENTS:-}")
        while read -r f; do [[ -n "$f" ]] && args+=(--patch "$f"); done < <(split "${MEMHP_PATCHES:-}")
    fi
    local rc=0
    "$MEMHP" "${args[@]}" 2>&1 | tee "$dir/memhp.log" || rc=${PIPESTATUS[0]}
    if [[ -f "$dir/report.json" ]]; then
        cmd_summary "$dir/report.json" || true
    fi
    echo "memhp-ci: job $job: memhp run exit $rc; outputs in $dir" >&2
    return "$rc"
}

cmd_merge() {
    local merged="$out/merged" reports=() f
    for f in "$out"/*/report.json; do
        [[ -f "$f" && "$f" != "$merged/report.json" ]] && reports+=("$f")
    done
    ((${#reports[@]})) || die "merge: no job report.json under $out/*/"
    mkdir -p "$merged"
    "$MEMHP" report --merge "${reports[@]}" -o "$merged/report.json"
    "$MEMHP" report "$merged/report.json" --format junit -o "$merged/junit.xml"
    "$MEMHP" report "$merged/report.json" --format kcidb -o "$merged/kcidb.json"
    "$MEMHP" report "$merged/report.json" --format ktap -o "$merged/ktap.txt"
    "$MEMHP" report "$merged/report.json" --format markdown -o "$merged/summary.md"
    cmd_summary "$merged/report.json"
    echo "memhp-ci: merged ${#reports[@]} report(s) into $merged/report.json" >&2
}

cmd_summary() {
    local report=${1:-}
    [[ -n "$report" ]] || die "summary REPORT: which report.json?"
    if [[ -n "${GITHUB_STEP_SUMMARY:-}" ]]; then
        "$MEMHP" report "$report" --format markdown >> "$GITHUB_STEP_SUMMARY"
    else
        "$MEMHP" report "$report" --format markdown
    fi
}

cmd_kcidb_submit() {
    local file="$out/merged/kcidb.json"
    [[ -f "$file" ]] || die "kcidb-submit: no $file (run: ci/memhp-ci.sh merge)"
    [[ -n "${KCIDB_PROJECT:-}" && -n "${KCIDB_TOPIC:-}" ]] || die "kcidb-submit: set KCIDB_PROJECT and KCIDB_TOPIC"
    local submit
    submit=$(command -v kcidb-submit || true)
    if [[ -z "$submit" && -x "$here/.venv/bin/pip" ]]; then     # KernelCI's client, into memhp's venv
        "$here/.venv/bin/pip" install -q "git+https://github.com/kernelci/kcidb.git" >&2
        submit="$here/.venv/bin/kcidb-submit"
    fi
    [[ -n "$submit" && -x "$submit" ]] || die "kcidb-submit not found: pip install git+https://github.com/kernelci/kcidb.git"
    if [[ -n "${KCIDB_CREDENTIALS_JSON:-}" && -z "${GOOGLE_APPLICATION_CREDENTIALS:-}" ]]; then
        # A CI secret holds the service account's key; kcidb-submit reads it from a file.
        local key
        key=$(mktemp)
        trap 'rm -f "$key"' EXIT
        printf '%s' "$KCIDB_CREDENTIALS_JSON" > "$key"
        export GOOGLE_APPLICATION_CREDENTIALS="$key"
    fi
    "$submit" -p "$KCIDB_PROJECT" -t "$KCIDB_TOPIC" < "$file"
}

case "${1:-}" in
    setup) cmd_setup ;;
    shards) shift; cmd_shards "$@" ;;
    run) cmd_run ;;
    merge) cmd_merge ;;
    summary) shift; cmd_summary "$@" ;;
    kcidb-submit) cmd_kcidb_submit ;;
    *) die "usage: ci/memhp-ci.sh setup|shards N|run|merge|summary REPORT|kcidb-submit" ;;
esac
