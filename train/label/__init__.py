"""AI feedback from a written constitution: `lorabay label` (RLAIF and Constitutional AI).

constitution.py  the principles file: parsing, checking (one line per problem), prompts
client.py        the OpenAI-compatible endpoint (httpx), pinned models, retries
judge.py         a verdict from the answer tokens' log-probs; both orders combined
modes.py         prefs (pairs judged, DPO records) and revise (critique, revision, SFT)
run.py           the run: options, journal (resume), concurrency, progress, output
provenance.py    what made a labelled file, and the entry a trained lineage keeps
gateway.py       `lorabay serve` started for a run and always stopped
teach.py         SFT records that teach a judge a rule a script can check
"""
