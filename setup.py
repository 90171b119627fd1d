"""The one compiled part of sshfiles: chacha20-poly1305 packets in one OpenSSL call each.

Everything else is in pyproject.toml. The extension is optional: without a C compiler (or Python's
headers) the install goes on without it and asyncssh_seam uses its pure-Python path (item 3d), which
the tests also cover. It needs no OpenSSL headers: it finds the system's libcrypto.so.3 at import.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("sshfiles._chachapoly", ["sshfiles/_chachapoly.c"], optional=True)])
