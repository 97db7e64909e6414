-- The users billing knows: their ids from UserRegistered (users.events), nothing personal. The
-- statements of anyone else are 404 USER_NOT_FOUND (docs/contract.md §6), as at the gateway; a
-- known user with no Huabei purchases has no statements ([]). Users with a billing account
-- (a drawdown) are known too: they registered before they could buy.
CREATE TABLE users (
    user_id        text PRIMARY KEY,
    registered_at  timestamptz NOT NULL
);
INSERT INTO users (user_id, registered_at) SELECT user_id, created_at FROM accounts ON CONFLICT DO NOTHING;
