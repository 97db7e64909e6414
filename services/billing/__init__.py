"""billing: Huabei cycles, statements, installments, penalties and repayments."""
