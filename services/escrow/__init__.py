"""escrow: holds funds per order; runs the release and refund sagas."""
