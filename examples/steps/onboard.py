"""Steps in a task: each retried on its own and kept, so a retry skips what succeeded.

    python examples/steps/onboard.py
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random

import bgtasks
from bgtasks import step

sent: list[str] = []


def fetch_rows(user_id: int) -> list[str]:  # sync: runs in a worker thread
    return [f"user-{user_id}", "friend-1"]


async def make_code() -> str:
    return f"{random.randrange(10**6):06d}"


async def send_invite(rows: list[str], code: str) -> int:
    if not sent:  # the mail server fails once
        sent.append("failed")
        raise ConnectionError("smtp: try again")
    sent.append(code)
    return len(rows)


async def main() -> None:
    rt = bgtasks.Runtime(backoff=bgtasks.Backoff(initial=0.1, max=0.5))

    @rt.background(retries=3)
    async def onboard(user_id: int) -> str:
        rows = await step.run("fetch waiting list", fetch_rows, user_id)
        code = await step.run("create invite code", make_code)
        await step.sleep("cool off", dt.timedelta(seconds=0.5))  # days, in real life
        await step.run("send invite", send_invite, rows, code, retries=2)
        return code

    async with rt:
        record = await onboard.submit(42).wait()
    print(record.status, record.result)
    for s in record.steps:
        print(f"  {s.name:<20} {s.status:<10} attempts={s.attempts}")


if __name__ == "__main__":
    asyncio.run(main())
