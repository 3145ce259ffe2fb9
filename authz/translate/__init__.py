"""Translation between a client format and an upstream kind: pure functions over bytes and headers.

One translator per (client format, upstream kind) pair (:mod:`authz.translate.registry`). The
ext_proc servicer owns the gRPC stream and calls the translator; translators never see protobuf
or sockets, so each is unit-tested with recorded streams fed one byte at a time.
"""
