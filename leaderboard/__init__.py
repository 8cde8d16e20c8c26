"""The ConcealBench leaderboard: records → static site, LEADERBOARD.md and results.csv.

``python -m leaderboard build`` (``make leaderboard``); see build.py and schema.json.
"""
