from fusedrl.cli import main

main()
