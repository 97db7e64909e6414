-- Wallets are kept from overdraft by the no_overdraft flag of their ledger account (shared/ledger.py),
-- no longer by their name: a user's wallet is opened with the flag at registration. Users
-- registered before that who never received money have no wallet account yet: open theirs.
INSERT INTO ledger_accounts (id, no_overdraft) SELECT 'wallet:' || user_id, true FROM users ON CONFLICT (id) DO NOTHING;
