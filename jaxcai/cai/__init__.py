"""The Constitutional AI pipeline: constitution, critique -> revision, AI feedback, stages.

constitution  principles, few-shot examples and templates (`load_constitution`)
critique      SL-CAI: critique -> revision rounds, SFT pairs
feedback      RL-CAI: response pairs, AI-feedback labels, preference records
evaluate      reward scores, harm shares and preference rates of responses
stages/       one module per pipeline stage, and the registry they declare in
run           the runner: stages in the order their needs allow (`run_cai`)
context       what the stages of one run share (`RunContext`)
settings      plugins, validation, the prompt split, the chat formats
io            atomic JSON/JSONL writes, stage records, resumable chunks
provenance    provenance records and model cards
report        `report.md` and its plots; the ablation table
pipeline      the public names, re-exported (`run_cai`, `stage_record`, ...)
"""
