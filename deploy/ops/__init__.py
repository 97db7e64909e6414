"""Operating Danbao: an order's or a user's whole story, dead letters, stuck work (`./danbao
order|user|dlq|doctor`), and the ops console that shows the same in a browser.

Like the audit, these tools read every service's schema (an operator's tool may; the services
never read each other's tables) and only ever write through the platform's own doors: a dead
letter is replayed by publishing it to its topic again, where the consumer validates it as usual.
"""
