"""`moa batch`: run a pipeline over a dataset, resumably, with exports for benchmark tools.

rows.py      reading and checking the input (AlpacaEval, MT-Bench, OpenAI messages)
store.py     the append-only, fsynced, lockable output that runs resume from
runner.py    a row worker (the pipeline, a row's record), rows concurrently in this process
export.py    AlpacaEval and MT-Bench (FastChat) answer files
progress.py  the bar on a terminal, periodic lines elsewhere
distributed.py  what every engine shares: the job, the ledger of rows waiting, held, written
shared_limits.py  provider limits held once for every worker (the Gatekeeper)
workers.py   --workers N: worker processes on this machine
ray_engine.py  --engine ray: the workers as Ray actors
"""

from moa.batch.rows import Row, load_rows
from moa.batch.runner import RowOutcome, run_batch, run_row
from moa.batch.store import OutputStore

__all__ = ["OutputStore", "Row", "RowOutcome", "load_rows", "run_batch", "run_row"]
