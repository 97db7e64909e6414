-- The credit review (handlers.review_limits, at every turn of run_timers: each second) asks for
-- the accounts whose last review is older than the interval, oldest first: by this index, instead
-- of a scan and a sort of every Huabei account each second.
CREATE INDEX huabei_accounts_review_due ON huabei_accounts (reviewed_at);
