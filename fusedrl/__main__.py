from fusedrl.cli.main import main

main()
