"""The Constitutional AI pipeline: constitution, critique -> revision, AI feedback, stages."""
