# BLAS for the fused blocks' GEMMs: OpenBLAS from the scipy-openblas32 wheel (PyPI),
# so no system BLAS is needed. Its symbols carry a `scipy_` prefix (scipy_cblas_sgemm,
# scipy_openblas_set_num_threads_local), which keeps it apart from any other BLAS
# loaded in the same process.
#
# Sets FASTVIS_BLAS_INCLUDE_DIR, FASTVIS_BLAS_LIBRARY (full path of the shared library)
# and FASTVIS_BLAS_LIBRARY_DIR. Override with -DFASTVIS_BLAS_INCLUDE_DIR=...
# -DFASTVIS_BLAS_LIBRARY=... (a libscipy_openblas.so built elsewhere).
if(NOT FASTVIS_BLAS_INCLUDE_DIR OR NOT FASTVIS_BLAS_LIBRARY)
  find_package(Python 3.9 REQUIRED COMPONENTS Interpreter)
  execute_process(
    COMMAND ${Python_EXECUTABLE} -c
      "import scipy_openblas32 as s, os; print(s.get_include_dir()); print(os.path.join(s.get_lib_dir(), s.get_library(True)))"
    OUTPUT_VARIABLE _fv_blas_out RESULT_VARIABLE _fv_blas_rc ERROR_VARIABLE _fv_blas_err
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _fv_blas_rc EQUAL 0)
    message(FATAL_ERROR
      "fastvis needs OpenBLAS from the scipy-openblas32 wheel: `pip install scipy-openblas32` "
      "(pip install . does this through the build requirements), or pass "
      "-DFASTVIS_BLAS_INCLUDE_DIR and -DFASTVIS_BLAS_LIBRARY.\n${_fv_blas_err}")
  endif()
  string(REPLACE "\n" ";" _fv_blas_list "${_fv_blas_out}")
  list(GET _fv_blas_list 0 _fv_inc)
  list(GET _fv_blas_list 1 _fv_lib)
  set(FASTVIS_BLAS_INCLUDE_DIR "${_fv_inc}" CACHE PATH "scipy-openblas32 include directory")
  set(FASTVIS_BLAS_LIBRARY "${_fv_lib}" CACHE FILEPATH "libscipy_openblas shared library")
endif()
get_filename_component(FASTVIS_BLAS_LIBRARY_DIR "${FASTVIS_BLAS_LIBRARY}" DIRECTORY)
message(STATUS "fastvis BLAS: ${FASTVIS_BLAS_LIBRARY}")
