"""The consumers' background offset commits (shared/consumer.Committer): nobody waits for the
broker, commits go one at a time and in order, offsets offered meanwhile are merged."""
import asyncio

from aiokafka import TopicPartition

from shared.consumer import Committer

A, B = TopicPartition("t", 0), TopicPartition("t", 1)


class Broker:
    """A commit that takes as long as the test says."""

    def __init__(self):
        self.commits: list[dict] = []
        self.release = asyncio.Event()
        self.in_flight = 0
        self.most_in_flight = 0

    async def commit(self, offsets):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.release.wait()
            self.commits.append(dict(offsets))
        finally:
            self.in_flight -= 1


async def test_offers_made_while_a_commit_is_in_flight_go_together_in_the_next_one():
    broker = Broker()
    committer = Committer(broker.commit)
    committer.offer({A: 5})  # returns at once: the loop goes on with the next batch
    await asyncio.sleep(0)
    committer.offer({A: 9, B: 3})
    committer.offer({A: 7})  # a lower offset never takes a partition back
    committer.offer({B: 4})
    broker.release.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert broker.commits == [{A: 5}, {A: 9, B: 4}]
    assert broker.most_in_flight == 1


async def test_commits_are_spaced_by_the_interval():
    broker = Broker()
    broker.release.set()
    committer = Committer(broker.commit, interval=0.2)
    committer.offer({A: 1})
    await asyncio.sleep(0.05)
    committer.offer({A: 2})
    committer.offer({A: 3})
    await asyncio.sleep(0.05)
    assert broker.commits == [{A: 1}]  # the second waits for the interval
    await asyncio.sleep(0.25)
    assert broker.commits == [{A: 1}, {A: 3}]


async def test_cancel_never_waits_for_the_broker():
    broker = Broker()  # never answers
    committer = Committer(broker.commit)
    committer.offer({A: 1})
    await asyncio.sleep(0)
    committer.cancel()
    await asyncio.sleep(0)
    assert broker.in_flight == 0 and broker.commits == []
