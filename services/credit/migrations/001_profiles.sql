-- The credit service's own copy of what it needs about users, built from UserRegistered
-- events (event-carried state: it never reads the gateway's tables).
CREATE TABLE profiles (
    user_id             text PRIMARY KEY,
    birth_date          date,
    phone               text,
    id_number           text,
    real_name_verified  boolean     NOT NULL,
    registered_at       timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL
);
