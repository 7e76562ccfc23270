"""Stage 5: workflows built on the stages below: bisect, replay, matrix."""
