"""payment-gateway: the edge. Users, wallets, payments and the payment saga."""
