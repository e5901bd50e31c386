#!/usr/bin/env bash
# Proves a clone alone passes: clones the committed HEAD into an empty temp directory, hides the
# steering repo's shared/ folder beside this checkout (a private mount namespace, as root), runs
# the tests there and checks that as many tests are collected as in this checkout.
#
#   dev/test_in_clone.sh collect   # collection only, with this checkout's venv (seconds; .ci/run)
#   dev/test_in_clone.sh fast      # the fast lane in the clone, this checkout's venv (make test-clone)
#   dev/test_in_clone.sh full      # `make test` in the clone, which builds its own venv
set -euo pipefail
mode=${1:-fast}
src=$(git rev-parse --show-toplevel)
venv_py="$src/.venv/bin/python"
fast_marks="not slow and not docker and not subprocess and not gcs"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
clone="$tmp/klong-jax"
git clone -q --no-local "$src" "$clone"
echo "clone: $clone ($(git -C "$clone" rev-parse --short HEAD)); nothing beside it: $(ls "$tmp")"

# "N tests collected" or, with -m, "N/TOTAL tests collected (K deselected)".
count_re='\([0-9][0-9]*\)\(/[0-9][0-9]*\)\{0,1\} tests\{0,1\} collected.*'
collected() {  # collected() DIR MARKS -> the number of tests pytest collects there.
  (cd "$1" && PYTHONPATH="$1" "$venv_py" -m pytest --collect-only -q -p no:cacheprovider \
     -p no:xdist -m "$2" tests 2>/dev/null | sed -n "s|^$count_re|\1|p" |
     tail -n 1)
}

case "$mode" in
  collect) marks="" ;;
  fast) marks="$fast_marks" ;;
  full) marks="" ;;
  *) echo "usage: $0 collect|fast|full" >&2; exit 2 ;;
esac
want=$(collected "$src" "$marks")

# The commands that run in the clone; shared/ beside the checkout is hidden while they run.
case "$mode" in
  collect) run="echo collected: \$(cd '$clone' && PYTHONPATH='$clone' '$venv_py' -m pytest --collect-only -q -p no:cacheprovider -p no:xdist ${marks:+-m '$marks'} tests 2>&1 | tail -n 1)" ;;
  fast) run="cd '$clone' && PYTHONPATH='$clone' '$venv_py' -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup -m '$fast_marks' tests" ;;
  full) run="cd '$clone' && make test" ;;
esac
shared="$(cd "$src/.." && pwd)/shared"
if [ -d "$shared" ] && [ "$(id -u)" = 0 ] && unshare --mount true 2>/dev/null; then
  echo "hiding $shared for the run (mount namespace)"
  out=$(unshare --mount --propagation private bash -c \
    "mount -t tmpfs -o ro none '$shared' && $run" 2>&1 | tee /dev/stderr)
else
  [ -d "$shared" ] && echo "warning: cannot hide $shared (needs root and unshare); it stays visible"
  out=$(bash -c "$run" 2>&1 | tee /dev/stderr)
fi

got=$(echo "$out" | sed -n "s|^collected: $count_re|\1|p" | tail -n 1)
if [ "$mode" != collect ]; then
  # pytest's summary: "N passed, M skipped, K deselected in ..."; count what ran or was deselected.
  got=$(echo "$out" | tail -n 1 | grep -oE '[0-9]+ (passed|failed|skipped|errors?|xfailed|xpassed)' |
        awk '{s += $1} END {print s + 0}')
fi
echo "tests in this checkout: $want; in the clone: $got"
if [ -z "$got" ] || [ "$got" != "$want" ]; then
  echo "FAIL: the clone collected or ran a different number of tests than this checkout" >&2
  exit 1
fi
echo "OK: a clone alone collects and runs the same $want tests"
