"""A reward module whose import raises something other than ImportError."""
raise ValueError("settings file missing")


def score(prompt, response, row):
    return 1.0
