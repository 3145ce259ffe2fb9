"""Operations: health and readiness, retention of old rows, and the ``authz doctor`` checks."""
