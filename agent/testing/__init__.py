"""Conversational testing: scenario files (`scenario`), the events a run records (`events`),
expectations checked over those events (`expect`) and the reports written from them (`report`).

The runner that plays scenarios against a live agent lives elsewhere; these modules never
depend on it, so a recorded event list can be re-checked and re-reported offline.
"""
