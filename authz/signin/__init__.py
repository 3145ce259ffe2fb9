"""Sign-in: the OIDC relying party, ID and logout token rules, admission, sessions and the portal."""
