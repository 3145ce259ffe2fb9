-- Back-channel logouts may be accepted while PostgreSQL is unreachable: they wait in a local
-- journal (authz.store.logout_spool) and are replayed once it answers. Each journal entry has a
-- random id, recorded here with the logout token's jti, so that replaying an entry whose first
-- write did commit (the process died, or stopped waiting, before removing the file) is recognised
-- as that same entry and not refused as a replay of the token (Back-Channel Logout 1.0, §2.6 step 7).
ALTER TABLE logout_jtis ADD COLUMN entry text;
