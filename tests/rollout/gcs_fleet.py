"""A stand-in rollout worker on a gs:// stream (the real claim/publish path, fake rollouts).

  python -m tests.rollout.gcs_fleet ROOT NAME GROUPS RECORDS LEASE_S PAUSE_S RUNLOG

Loops over groups g000.. until every one is done: claim, "roll out" RECORDS records (ids
`<group>-<i>`), append `<group>` to RUNLOG (one line per run started), publish (sleeping PAUSE_S
inside the shard writer: the SIGKILL window), mark done. Each worker claims from its own "pod"
host name, so a dead worker's claims go stale only by a restart under its name or lease expiry.
"""

import random
import sys
import time

from klong_jax.rollout.stream import open_stream


def main(argv: list[str]) -> None:
  root, name, groups, records, lease_s, pause_s, runlog = argv[1:8]
  s = open_stream(root, name, float(lease_s))
  s.host = f"pod-{name}"  # One pod per worker: its pid is not checked by the others.
  gids = [f"g{i:03d}" for i in range(int(groups))]
  random.Random(name).shuffle(gids)
  while True:
    left = [g for g in gids if not s.is_done(g)]
    if not left:
      break
    for g in left:
      shard = s.claim(g, 0)
      if shard is None:
        continue
      if s.published(shard):
        s.mark_done(g, shard, -1)
        continue
      with open(runlog, "a") as f:
        f.write(f"{g}\n")
      recs = [f"{g}-{i}".encode() for i in range(int(records))]
      s.publish(g, shard, recs, float(pause_s))
    time.sleep(0.2)
  s.close()


if __name__ == "__main__":
  main(sys.argv)
