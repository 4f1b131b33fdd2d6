"""The jobs a user runs (`python -m lnfm <job>`): each wires the library layers below into one command."""
