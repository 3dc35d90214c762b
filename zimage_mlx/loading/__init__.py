"""Reading, converting, quantizing and fetching weights."""
