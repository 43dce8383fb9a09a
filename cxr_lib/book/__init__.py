"""The book: parameter profiles, the chapter runner (papermill) and Sphinx helpers."""
