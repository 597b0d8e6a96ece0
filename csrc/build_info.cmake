# cmake -P script (run by CMakeLists.txt whenever a source changes): writes the build metadata
# that mvit3/ops/cuda_lib.py checks before loading the library.
#
# sources_hash = first 16 hex digits of sha256 over the lines "<sha256 of file>  <path>\n" of
# csrc/**, CMakeLists.txt and mvit3/ops/schemas.def (included by csrc/ops.cpp), sorted by path
# (mvit3.build.sources_hash computes the same over mvit3.build.HASHED_FILES).
file(GLOB_RECURSE _files RELATIVE "${SOURCE_DIR}" "${SOURCE_DIR}/csrc/*")
list(APPEND _files CMakeLists.txt mvit3/ops/schemas.def)
list(SORT _files)
set(_manifest "")
foreach(_file IN LISTS _files)
  file(SHA256 "${SOURCE_DIR}/${_file}" _digest)
  string(APPEND _manifest "${_digest}  ${_file}\n")
endforeach()
string(SHA256 _hash "${_manifest}")
string(SUBSTRING "${_hash}" 0 16 _hash)

string(REPLACE "," "\", \"" _archs "${ARCHS}")  # ARCHS: comma-separated
string(TIMESTAMP _now "%Y-%m-%dT%H:%M:%SZ" UTC)
file(WRITE "${OUTPUT}" "{
  \"torch_version\": \"${TORCH_VERSION}\",
  \"cuda_version\": \"${CUDA_VERSION}\",
  \"nvcc_version\": \"${NVCC_VERSION}\",
  \"archs\": [\"${_archs}\"],
  \"sources_hash\": \"${_hash}\",
  \"build_type\": \"${BUILD_TYPE}\",
  \"built_at\": \"${_now}\"
}
")
