"""credit: profiles (from the gateway's events), scores, Huabei accounts, limits, reservations."""
