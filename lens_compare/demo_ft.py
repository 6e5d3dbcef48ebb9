"""``python -m lens_compare.demo_ft``: build the demo fine-tune on first use and report it.

The fine-tune itself lives in ``lens_compare.demo.fine_tune``; this is its command.
"""

from lens_compare.demo.fine_tune import main

if __name__ == "__main__":
    from lens_compare.util.cli import exit_with

    exit_with(main)
