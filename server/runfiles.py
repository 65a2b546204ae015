"""Names of the files in a run folder, shared by the plan (which writes them) and the launcher.

Kept apart so that ``flower-server run`` and ``flower-simulation run``, which only follow and
read these files, do not import the plan (torch, MONAI) into the launching process.
"""

PROGRESS_NAME = "progress.log"
SUMMARY_NAME = "summary.json"
