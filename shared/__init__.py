"""Code every Danbao service uses: contract models, money, clock, outbox/inbox, consumer loop, HTTP basics."""
