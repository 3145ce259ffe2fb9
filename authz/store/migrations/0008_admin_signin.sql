-- Sign-ins to the admin page (/admin) use the same OIDC round trip as the device flow, with the same
-- redirect URI; `purpose` tells the callback which one it is finishing. Admin sign-ins have no
-- device code, so their user_code is ''.
ALTER TABLE auth_requests ADD COLUMN purpose text NOT NULL DEFAULT 'device';
