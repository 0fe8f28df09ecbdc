"""The producer/consumer activation buffer of App. A.1, serving every row `passes` times.

Activations of neighbouring positions in one document are highly correlated (§3.1), so the SAE
must see them in random order, yet a whole dataset of activations does not fit in memory. The
buffer holds `size` rows. Training starts when it is full; each minibatch takes the next unread
rows; when half of the buffer has been read, the used-up rows are replaced by new rows from the
producer and the WHOLE buffer is shuffled, so new rows mix with the old ones.

With passes = 1 (the paper) every row is served once. A short run on a slow LM serves each row
`passes` times (recipe.budget_rule chooses how many): a row stays until it has been served that
often, so the LM makes 1/passes of the rows trained on, in `size` rows of memory. The first fill
starts with use counts staggered over 1..passes, so old and new rows mix from the first refill on.

The producer is any iterator of (n, C) tensors (n may vary, C fixed): the LM's rows
(data.activation_producer) or pre-saved ones (App. A.3). This file imports nothing from the
project, so it is tested with a fake producer.
"""
import collections
import math

import torch


class ActivationBuffer:
    def __init__(self, producer, size, batch_size, seed=0, device="cpu", rows_to_serve=None,
                 passes=1):
        """rows_to_serve: in all (None: endless), so the producer makes no row the run will not
        use; passes: times each row is served."""
        assert batch_size <= size // 2, "batch_size must be at most half the buffer"
        self.producer = iter(producer)
        self.size = size
        self.batch_size = batch_size
        self.passes = passes
        self.device = device
        self.remaining = math.inf if rows_to_serve is None else rows_to_serve  # still to serve
        self.generator = torch.Generator().manual_seed(seed)
        self.leftover = None  # rows the producer made that did not fit yet: served first
        self.exhausted = False  # the producer has no rows left
        self.data = None  # (n, C), n <= size, made by the first fill
        self.uses = None  # (n,) how many more times each row of data will be served
        self.read = 0  # rows of data served since the last shuffle (they sit at data[:read])

    def next_batch(self):
        """(batch_size, C): the next minibatch, or None when the run's rows are all served or a
        finite producer has run dry."""
        if self.remaining < self.batch_size:
            return None
        # train only once the buffer is full; refill when half of it has been read
        if self.data is None:
            self._first_fill()
        elif self.read >= self.size // 2 or self.read + self.batch_size > len(self.data):
            self._refill()
        if self.read + self.batch_size > len(self.data):  # the producer ran dry
            return None
        batch = self.data[self.read:self.read + self.batch_size]
        self.uses[self.read:self.read + self.batch_size] -= 1
        self.read += self.batch_size
        self.remaining -= self.batch_size
        return batch

    def _first_fill(self):
        """Fill the buffer, each row with 1..passes uses left at random, and shuffle."""
        rows = self._take(min(self.size, first_fill_rows(self.remaining, self.passes)))
        if rows is None:
            raise RuntimeError("the activation producer yielded no rows")
        self.data = rows
        self.uses = torch.randint(1, self.passes + 1, (len(rows),), generator=self.generator,
                                  dtype=torch.int16).to(self.device)
        self._shuffle()

    def _refill(self):
        """Replace the used-up rows by new ones (no more than the run still needs), shuffle."""
        # 1. drop the rows served `passes` times
        left = self.uses > 0
        self.data = self.data[left]
        self.uses = self.uses[left]
        # 2. new rows for the uses held rows cannot cover: at least a batch, at most what fits
        owed = self.remaining - self.uses.sum().item()
        wanted = max(_ceil(owed / self.passes), self.batch_size - len(self.data))
        rows = self._take(min(self.size - len(self.data), max(0, wanted)))
        # 3. the new rows, with all their uses ahead, join the others
        if rows is not None:
            self.data = torch.cat([rows, self.data])
            self.uses = torch.cat([self.uses.new_full((len(rows),), self.passes), self.uses])
        self._shuffle()

    def _shuffle(self):
        """Mix the whole buffer (rows and their use counts), to be read from the top."""
        perm = torch.randperm(len(self.data), generator=self.generator).to(self.data.device)
        self.data = self.data[perm]
        self.uses = self.uses[perm]
        self.read = 0

    def _take(self, n):
        """Up to n new rows, the leftover of the producer's last tensor first; what does not
        fit becomes the leftover. None when the producer has no row left."""
        parts = []
        have = 0
        while have < n:
            rows = self.leftover
            if rows is None and not self.exhausted:
                rows = next(self.producer, None)
                self.exhausted = rows is None
            if rows is None:
                break
            rows = rows.to(self.device)
            self.leftover = rows[n - have:] if have + len(rows) > n else None
            parts.append(rows[:n - have])
            have += len(parts[-1])
        return torch.cat(parts) if parts else None

    def state_dict(self):
        """Everything to continue exactly: rows, uses, read pointer, leftover, RNG state."""
        leftover = self.data[:0] if self.leftover is None else self.leftover
        return {"data": self.data, "uses": self.uses, "pending": leftover,
                "generator": self.generator.get_state(), "read": self.read,
                "remaining": self.remaining, "exhausted": self.exhausted}

    def load_state_dict(self, state):
        self.data = state["data"].to(self.device)
        self.uses = state["uses"].to(self.device)
        self.read = state["read"]
        self.leftover = state["pending"].to(self.device) if len(state["pending"]) else None
        self.generator.set_state(state["generator"])
        self.remaining = state["remaining"]
        self.exhausted = state["exhausted"]


def _ceil(x):
    return x if x == math.inf else math.ceil(x)


def first_fill_rows(rows_to_serve, passes):
    """Rows the first fill needs: its rows' use counts are staggered over 1..passes, so they
    serve (passes + 1) / 2 times each on average. A buffer of this size holds a short run whole."""
    return _ceil(rows_to_serve * 2 / (passes + 1))


class FanOut:
    """One iterator per place (layer, site) over a producer of {place: rows} dicts, so that one
    LM forward feeds the buffers of every hooked place. Each place queues what it has not
    consumed yet; `made` counts the producer's items, which is all a resumed run needs to skip
    to the same place in the data."""

    def __init__(self, producer, places, made=0):
        self.producer = iter(producer)
        self.made = made
        self.queues = {place: collections.deque() for place in places}

    def __getitem__(self, place):
        """The rows of one place, as the producer makes them (a generator)."""
        while True:
            if not self.queues[place]:
                out = next(self.producer, None)
                if out is None:
                    return
                self.made += 1
                for other, queue in self.queues.items():
                    queue.append(out[other])
            yield self.queues[place].popleft()

    def state_dict(self):
        """The items made so far and what each place has not consumed: all a resume needs."""
        return {"made": self.made, "queues": [list(q) for q in self.queues.values()]}

    def load_state_dict(self, state):
        self.made = state["made"]
        for queue, saved in zip(self.queues.values(), state["queues"]):
            queue.clear()
            queue.extend(saved)
