"""Build the Cython extensions block_sgl._fastsim, block_sgl._page_hash, block_sgl._capture and
block_sgl._features (metadata lives in pyproject.toml). ``_page_hash`` calls OpenSSL's SHA256
(libcrypto, which CPython's hashlib already uses): its headers come with Debian's ``libssl-dev``
(``openssl-devel`` elsewhere). ``_features`` calls zlib's crc32 (the library CPython's zlib
module uses): headers in ``zlib1g-dev`` (``zlib-devel``)."""
import os
import sysconfig

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup


def _check_openssl_headers() -> None:
    dirs = [os.environ.get("OPENSSL_INCLUDE_DIR"), sysconfig.get_paths().get("include"),
            "/usr/include", "/usr/local/include", "/opt/homebrew/opt/openssl/include",
            "/usr/local/opt/openssl/include"]
    if not any(d and os.path.isfile(os.path.join(d, "openssl", "sha.h")) for d in dirs):
        raise SystemExit(
            "block_sgl: OpenSSL's headers (openssl/sha.h) were not found; block_sgl._page_hash "
            "needs them. Install them (Debian/Ubuntu: `apt-get install libssl-dev`; Fedora: "
            "`dnf install openssl-devel`) or set OPENSSL_INCLUDE_DIR.")


_check_openssl_headers()
_include = [d for d in [os.environ.get("OPENSSL_INCLUDE_DIR")] if d]
extensions = [
    Extension(
        "block_sgl._fastsim",
        ["block_sgl/_fastsim.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
    Extension("block_sgl._capture", ["block_sgl/_capture.pyx"], extra_compile_args=["-O3"]),
    # zlib: the crc32 that zlib.crc32 calls (the n-gram word hashes). No fused multiply-adds:
    # the features must round exactly as the pure-Python specification's do.
    Extension(
        "block_sgl._features",
        ["block_sgl/_features.pyx"],
        libraries=["z"],
        extra_compile_args=["-O3", "-ffp-contract=off"],
    ),
    Extension(
        "block_sgl._page_hash",
        ["block_sgl/_page_hash.pyx"],
        include_dirs=_include,
        libraries=["crypto"],
        extra_compile_args=["-O3"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
