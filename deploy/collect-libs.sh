#!/bin/sh
# Copies the shared libraries that a loupe binary loads from the PyTorch wheel into one
# flat directory of the runtime image, and nothing else of the wheel.
#
#   deploy/collect-libs.sh SITE_PACKAGES BINARY DEST [LIBRARY_GLOB ...]
#
# The libraries are those `ldd` resolves inside SITE_PACKAGES for BINARY and for the
# libraries named by the globs: libtorch opens some with dlopen at run time, so no
# linker records them (see the Dockerfiles for which). The system's own (glibc,
# libstdc++) come from the runtime image's Debian. Afterwards every copied library must
# resolve from DEST and the system alone, or the build fails; the one allowed gap is
# libcuda.so.1, the driver, which the node provides.
set -eu
site=$1 bin=$2 dest=$3
shift 3
dirs=$(find "$site/torch/lib" "$site"/nvidia/*/lib -maxdepth 0 -type d 2>/dev/null | tr '\n' ':')
roots=$bin
for glob in "$@"; do
  for lib in $(find "$site/torch/lib" "$site"/nvidia/*/lib -maxdepth 1 -name "$glob" 2>/dev/null); do
    roots="$roots $lib"
  done
done
mkdir -p "$dest"
for root in $roots; do
  case $root in "$site"/*) cp -L "$root" "$dest/" ;; esac
  LD_LIBRARY_PATH=$dirs ldd "$root" | awk -v site="$site" 'index($3, site) == 1 { print $3 }'
done | sort -u | while read -r lib; do cp -L "$lib" "$dest/"; done
missing=$(LD_LIBRARY_PATH=$dest ldd "$bin" "$dest"/* | awk '/not found/ && $1 != "libcuda.so.1" { print $1 }' | sort -u)
if [ -n "$missing" ]; then
  echo "collect-libs: these libraries do not resolve from $dest: $missing" >&2
  exit 1
fi
echo "collect-libs: $(ls "$dest" | wc -l) libraries, $(du -sh "$dest" | cut -f1)"
