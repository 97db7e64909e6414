-- The saga commits a drawdown before escrow holds the money (docs/design.md, Credit): a commit
-- may be refused (state 'refused' with its reason, already allowed), and a re-sent CommitCredit
-- is answered with the same DrawdownCommitted, so the commit's time is kept.
ALTER TABLE reservations ADD COLUMN committed_at timestamptz;
UPDATE reservations SET committed_at = updated_at WHERE state = 'committed';
