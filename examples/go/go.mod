module example.com/mlxhost

go 1.23
