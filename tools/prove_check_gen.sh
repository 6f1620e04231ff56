#!/usr/bin/env bash
# Proves that `make check-gen` catches a proto change committed without
# regenerated stubs: on a scratch clone, add a field and expect check-gen to fail.
set -euo pipefail
repo=$(git rev-parse --show-toplevel)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
git clone -q "$repo" "$scratch/repo"
cd "$scratch/repo"
# Reuse the installed tools instead of installing them again.
ln -s "$repo/.venv" .venv
ln -s "$repo/.bin" .bin
ln -s "$repo/clients/ts/node_modules" clients/ts/node_modules
ln -s "$repo/web/node_modules" web/node_modules
printf '%s\n' .venv .bin clients/ts/node_modules web/node_modules >>.git/info/exclude
# Older than what is installed, so make installs nothing.
touch -d @0 pyproject.toml clients/ts/package-lock.json web/package-lock.json
sed -i 's/^  int64 overrun_micros = 9 \[(google.api.field_behavior) = OUTPUT_ONLY\];$/&\n  \/\/ A field added without regenerating the stubs.\n  int64 drift_micros = 99;/' \
  proto/runcap/v1/budget.proto
grep -q drift_micros proto/runcap/v1/budget.proto || { echo "could not edit the proto" >&2; exit 1; }
git -c user.name=ci -c user.email=ci@localhost commit -qam "a proto change without make gen"
if make -s check-gen >check-gen.log 2>&1; then
  cat check-gen.log
  echo "check-gen passed on a proto change without regeneration: it does not work" >&2
  exit 1
fi
grep -q "generated code is out of date" check-gen.log
# ...and for the right reason: the stubs of the changed proto.
for stub in budget_pb2.py budget.pb.go budget_pb.ts; do
  grep -q "$stub" check-gen.log || { cat check-gen.log; echo "no diff in $stub" >&2; exit 1; }
done
echo "check-gen caught a proto change without regeneration, as it should"
