"""Build the compiled data path (Cython) of pyvhost; everything else is in pyproject.toml."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

CFLAGS = ["-O3", "-fno-strict-aliasing", "-Wno-unused-function"]
LDFLAGS: list[str] = []
if os.environ.get("PYVHOST_SANITIZE"):
    # AddressSanitizer + UBSan (make asan-test). Same semantics as the normal build
    # (-fno-strict-aliasing); every UBSan finding is fatal, not a message to scroll past.
    SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    CFLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fno-strict-aliasing",
              "-Wno-unused-function", *SANITIZE]
    LDFLAGS = list(SANITIZE)

MODULES = ["_memory", "_pktpool", "_vring", "_port", "_vhostport", "_tap", "_afpacket", "_poll",
           "_flow", "_edit", "_trie", "_classifier", "_fdb", "_punt", "_group", "_meter",
           "_switch", "_driver", "_gen", "_offload", "_guest", "_capture", "_tunnel", "_corelat"]

# the afxdp port class links libxdp (Debian libxdp-dev, which make debs installs); without
# its headers the switch is built without it and type=afxdp says so
LIBRARIES = {"_afxdp": ["xdp", "bpf"]}
if os.path.exists("/usr/include/xdp/xsk.h"):
    MODULES.append("_afxdp")

extensions = [
    Extension(
        f"pyvhost.{name}",
        [f"pyvhost/{name}.pyx"],
        include_dirs=["pyvhost"],
        libraries=LIBRARIES.get(name, []),
        extra_compile_args=CFLAGS,
        extra_link_args=LDFLAGS,
    )
    for name in MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
