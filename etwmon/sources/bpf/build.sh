#!/bin/sh
# Rebuild etwmon.bpf.o (and etwmon_nopace.bpf.o) from etwmon.bpf.c and imageload.bpf.o from imageload.bpf.c, reproducibly: the same source, clang major and libbpf headers give
# the same bytes (CI rebuilds it and compares with the committed object).
#   sh etwmon/sources/bpf/build.sh [OUTDIR]      (default: next to this script)
# Needs clang 14 and llvm 14 (Debian 12: apt-get install clang-14 llvm-14) and libbpf's headers
# (libbpf-dev 1.1). Debug paths are mapped to "." and DWARF is stripped; .BTF and .BTF.ext (the types and
# line info CO-RE and the verifier use) stay.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "${1:-$here}" && cd "${1:-$here}" && pwd)
clang=${CLANG:-clang-14}
strip=${LLVM_STRIP:-llvm-strip-14}
major=$("$clang" -dumpversion | cut -d. -f1)
if [ "$major" != 14 ]; then
    echo "build.sh: $clang is clang $major; the committed object is built with clang 14" >&2
    exit 1
fi
cd "$here"
# etwmon_nopace.bpf.o: etwmon.bpf.c without the wake-up pacer (a timer), for kernels that refuse one there.
for name in etwmon imageload etwmon_nopace; do
    src=$name.bpf.c
    define=
    if [ "$name" = etwmon_nopace ]; then
        src=etwmon.bpf.c
        define=-DETWMON_NO_PACER
    fi
    "$clang" -target bpf -O2 -g -mcpu=v3 -Wall -Werror $define \
        -fdebug-prefix-map="$here"=. -fno-ident \
        -c "$src" -o "$out/$name.bpf.o.tmp"
    "$strip" -g "$out/$name.bpf.o.tmp"
    mv "$out/$name.bpf.o.tmp" "$out/$name.bpf.o"
done
