"""The request path: the ext_authz and ext_proc servicers, the decision core and the handlers."""
