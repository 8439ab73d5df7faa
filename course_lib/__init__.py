"""course_lib: the library behind the LLM-training course.

Each module holds one idea; notebooks import them rather than paste code. See README.md.
"""

__version__ = "0.1.0"
