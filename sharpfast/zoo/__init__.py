"""Small models that ship with sharpfast. In progress: the "digits" data set (digits_data.py);
its training script, weights and evaluation harness are still to come (issue 4)."""
